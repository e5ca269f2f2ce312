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
    /// The same backend when it is CUDA, for what the `Backend` trait does not carry (the
    /// device oracle density).
    pub cuda: Option<flexprefill_cuda::CudaBackend>,
}

/// Opens the backend `choice` asks for; `threads` sizes the CPU backend's pool (default: one
/// thread per core, or `RAYON_NUM_THREADS`).
pub fn open(choice: BackendChoice, threads: Option<usize>) -> Result<Chosen> {
    let cpu = || -> Result<(Box<dyn Backend>, usize)> {
        let b = match threads {
            Some(t) => flexprefill_cpu::CpuBackend::with_threads(t)
                .map_err(|e| anyhow::anyhow!("--threads {t}: {e}"))?,
            None => flexprefill_cpu::CpuBackend::new(),
        };
        let n = b.threads();
        Ok((Box::new(b), n))
    };
    match choice {
        BackendChoice::Cpu => {
            let (backend, n) = cpu()?;
            Ok(Chosen {
                backend,
                reason: format!("--backend cpu, {}", threads_text(n)),
                cuda: None,
            })
        }
        BackendChoice::Cuda => {
            let (gpu, what) = cuda().map_err(|e| {
                anyhow::anyhow!(
                    "--backend cuda: no usable GPU: {}; use --backend cpu or auto",
                    one_line(&e)
                )
            })?;
            Ok(Chosen {
                backend: Box::new(gpu.clone()),
                reason: format!("--backend cuda: {what}"),
                cuda: Some(gpu),
            })
        }
        BackendChoice::Auto => match cuda() {
            Ok((gpu, what)) => Ok(Chosen {
                backend: Box::new(gpu.clone()),
                reason: format!("auto: {what}"),
                cuda: Some(gpu),
            }),
            Err(e) => {
                let (backend, n) = cpu()?;
                Ok(Chosen {
                    backend,
                    reason: format!(
                        "auto: no usable GPU ({}); using the CPU, {}",
                        one_line(&e),
                        threads_text(n)
                    ),
                    cuda: None,
                })
            }
        },
    }
}

fn threads_text(n: usize) -> String {
    if n == 1 {
        "1 thread".into()
    } else {
        format!("{n} threads")
    }
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// The CUDA backend on device 0 and a description of the device. Without a driver the
/// constructor returns a typed error (never a panic), which `auto` turns into the CPU.
fn cuda() -> Result<(flexprefill_cuda::CudaBackend, String)> {
    let gpu = flexprefill_cuda::CudaBackend::new()?;
    let info = gpu.device().info();
    let what = format!(
        "GPU {} ({}, compute capability {}.{})",
        info.ordinal, info.name, info.compute_capability.0, info.compute_capability.1
    );
    Ok((gpu, what))
}
