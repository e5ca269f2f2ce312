//! Picking the backend: CUDA when asked for or usable, the CPU otherwise, and saying why.

use anyhow::Result;
use clap::ValueEnum;
use flexprefill_core::Backend;

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA if a GPU is usable, else the CPU (and the report says why).
    Auto,
    /// The CPU backend (rayon + matrixmultiply).
    Cpu,
    /// The CUDA backend; an error when no GPU is usable.
    Cuda,
}

/// The backend to run, and a sentence on why it was chosen.
pub struct Chosen {
    /// The backend.
    pub backend: Box<dyn Backend>,
    /// Why (printed in the report and the JSON `backend_reason`).
    pub reason: String,
}

/// Opens the backend `choice` asks for.
pub fn open(choice: BackendChoice) -> Result<Chosen> {
    match choice {
        BackendChoice::Cpu => Ok(Chosen {
            backend: cpu()?,
            reason: "--backend cpu".into(),
        }),
        BackendChoice::Cuda => {
            let (backend, what) = cuda().map_err(|e| {
                anyhow::anyhow!(
                    "--backend cuda: no usable GPU: {}; use --backend cpu or auto",
                    one_line(&e)
                )
            })?;
            Ok(Chosen {
                backend,
                reason: format!("--backend cuda: {what}"),
            })
        }
        BackendChoice::Auto => match cuda() {
            Ok((backend, what)) => Ok(Chosen {
                backend,
                reason: format!("auto: {what}"),
            }),
            Err(e) => Ok(Chosen {
                backend: cpu()?,
                reason: format!("auto: no usable GPU ({}); using the CPU", one_line(&e)),
            }),
        },
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn cpu() -> Result<Box<dyn Backend>> {
    Ok(Box::new(flexprefill_cpu::CpuBackend::new()))
}

/// The CUDA backend on device 0 and a description of the device. Without a driver the
/// constructor returns a typed error (never a panic), which `auto` turns into the CPU.
fn cuda() -> Result<(Box<dyn Backend>, String)> {
    let gpu = flexprefill_cuda::CudaBackend::new()?;
    let info = gpu.device().info();
    let what = format!(
        "GPU {} ({}, compute capability {}.{})",
        info.ordinal, info.name, info.compute_capability.0, info.compute_capability.1
    );
    Ok((Box::new(gpu), what))
}
