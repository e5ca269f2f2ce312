//! Kernel registry: `.cu` sources compiled by NVRTC at first use, cached per compile-time key.
//!
//! Each kernel family is one `.cu` file (`include_str!`). A [`KernelKey`] spells every
//! compile-time parameter (family, dtype, head_dim, block_size, extra defines; the device's
//! arch is added by the registry), as FlashInfer's JIT keys do, so two launches that need
//! different code never share a module. The first [`KernelRegistry::function`] call for a key
//! compiles the source to a cubin for the device's exact arch (`sm_90a` on Hopper, so `wgmma`
//! and `setmaxnreg` are available), loads it, and caches the module for the life of the device.
//!
//! The source sees these macros:
//!
//! | macro | value |
//! |---|---|
//! | `KEY_DTYPE` | 0 f32, 1 f16, 2 bf16 (`KEY_DTYPE_F32` ... also defined) |
//! | `KEY_HEAD_DIM` | head_dim, 0 when the family does not care |
//! | `KEY_BLOCK_SIZE` | block_size, 0 when the family does not care |
//! | `KEY_ARCH` | compute capability as `major * 10 + minor` (90 on H100/H200) |
//! | each of `KernelKey::defines` | its value |
//!
//! and can `#include "flexprefill_common.cuh"` (embedded, see `kernels/common.cuh`): fixed
//! width integers, bf16/f16 conversion, `cp.async`, `ldmatrix`, `mma.sync` wrappers, written
//! with inline PTX so no CUDA toolkit header is needed.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::sys as nvrtc;
use flexprefill_core::DType;

use crate::error::{CudaError, Result};
use crate::kcache::{cache_key, DiskCache, KernelCache};

/// One `.cu` file of kernels.
#[derive(Debug)]
pub struct KernelFamily {
    /// Short name, used in errors and as the NVRTC program name.
    pub name: &'static str,
    /// The CUDA C++ source (`include_str!("../kernels/NAME.cu")`).
    pub source: &'static str,
}

/// Headers every family may include, by name.
const HEADERS: &[(&str, &str)] = &[(
    "flexprefill_common.cuh",
    include_str!("../kernels/common.cuh"),
)];

/// Everything that selects a compiled module, apart from the device (the registry is per
/// device, and adds the arch itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// The family's name (the `KernelFamily` is passed next to the key).
    pub family: &'static str,
    /// Element type of the tensors the kernel reads; `None` when it does not care.
    pub dtype: Option<DType>,
    /// head_dim, 0 when the family does not care.
    pub head_dim: u32,
    /// block_size, 0 when the family does not care.
    pub block_size: u32,
    /// Extra compile-time parameters (tile sizes, variants), passed as `-DNAME=value`.
    pub defines: Vec<(&'static str, i64)>,
}

impl KernelKey {
    /// A key with no extra defines.
    pub fn new(
        family: &KernelFamily,
        dtype: Option<DType>,
        head_dim: usize,
        block_size: usize,
    ) -> Self {
        Self {
            family: family.name,
            dtype,
            head_dim: head_dim as u32,
            block_size: block_size as u32,
            defines: Vec::new(),
        }
    }

    /// Adds `-DNAME=value`.
    pub fn define(mut self, name: &'static str, value: i64) -> Self {
        self.defines.push((name, value));
        self
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "dtype {}, head_dim {}, block_size {}",
            self.dtype.map_or("-", |d| d.name()),
            self.head_dim,
            self.block_size
        );
        for (n, v) in &self.defines {
            s.push_str(&format!(", {n}={v}"));
        }
        s
    }
}

/// A compiled module and what NVRTC said while building it (registers, spills: the
/// `ptxas -v` report, kept so benches and notes can print it).
#[derive(Debug)]
pub struct CompiledModule {
    /// The loaded module.
    pub module: Arc<CudaModule>,
    /// NVRTC's log (empty when it had nothing to say).
    pub log: String,
}

/// Loaded functions by (key, name), with the largest dynamic shared memory their limit was
/// raised to.
type FunctionMap = HashMap<(KernelKey, &'static str), (CudaFunction, usize)>;

/// Compiled modules of one device, keyed by [`KernelKey`].
#[derive(Debug)]
pub struct KernelRegistry {
    ctx: Arc<CudaContext>,
    arch: (i32, i32),
    include_paths: Vec<String>,
    modules: Mutex<HashMap<KernelKey, Arc<CompiledModule>>>,
    /// Loaded functions and the largest dynamic shared memory their limit was raised to.
    functions: Mutex<FunctionMap>,
    /// The persistent cubin cache (`None`: off).
    disk: Option<DiskCache>,
    /// Modules loaded from the persistent cache / compiled by NVRTC in this registry.
    disk_hits: AtomicUsize,
    compiled: AtomicUsize,
}

impl KernelRegistry {
    pub(crate) fn new(ctx: Arc<CudaContext>, arch: (i32, i32), cache: &KernelCache) -> Self {
        // Toolkit headers are not needed by our kernels (common.cuh uses inline PTX), but a
        // family may include them: look where toolkits usually live.
        let mut include_paths = Vec::new();
        for var in ["CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
            if let Ok(p) = std::env::var(var) {
                include_paths.push(format!("{p}/include"));
            }
        }
        include_paths.push("/usr/local/cuda/include".into());
        include_paths.retain(|p| std::path::Path::new(p).is_dir());
        Self {
            ctx,
            arch,
            include_paths,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            disk: cache.resolve().map(DiskCache::new),
            disk_hits: AtomicUsize::new(0),
            compiled: AtomicUsize::new(0),
        }
    }

    /// Modules this registry loaded from the persistent kernel cache.
    pub fn disk_cache_hits(&self) -> usize {
        self.disk_hits.load(Ordering::Relaxed)
    }

    /// Modules this registry compiled with NVRTC.
    pub fn compiled_modules(&self) -> usize {
        self.compiled.load(Ordering::Relaxed)
    }

    /// The arch string NVRTC compiles for (see [`arch_name`]).
    pub fn arch_name(&self) -> String {
        arch_name(self.arch)
    }

    /// The module for `key`, compiling and loading it at first use.
    pub fn module(&self, family: &KernelFamily, key: &KernelKey) -> Result<Arc<CompiledModule>> {
        debug_assert_eq!(family.name, key.family, "key built for another family");
        if let Some(m) = self.lock_modules().get(key) {
            return Ok(m.clone());
        }
        // Compile outside the lock would let two threads compile the same key; compiling
        // inside keeps it simple and happens once per key per process.
        let mut modules = self.lock_modules();
        if let Some(m) = modules.get(key) {
            return Ok(m.clone());
        }
        let (cubin, log) = self.compile(family, key)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))?;
        let m = Arc::new(CompiledModule { module, log });
        modules.insert(key.clone(), m.clone());
        Ok(m)
    }

    /// Function `name` of the module for `key`. `dynamic_smem` is the dynamic shared memory
    /// the caller will launch it with: above the 48 KiB default the function's limit is raised
    /// (again whenever a later call asks for more than any earlier one).
    pub fn function(
        &self,
        family: &KernelFamily,
        key: &KernelKey,
        name: &'static str,
        dynamic_smem: usize,
    ) -> Result<CudaFunction> {
        let fkey = (key.clone(), name);
        if let Some((f, smem)) = self.lock_functions().get_mut(&fkey) {
            if dynamic_smem > *smem {
                raise_smem(f, dynamic_smem)?;
                *smem = dynamic_smem;
            }
            return Ok(f.clone());
        }
        let m = self.module(family, key)?;
        let f = m.module.load_function(name)?;
        raise_smem(&f, dynamic_smem)?;
        self.lock_functions()
            .insert(fkey, (f.clone(), dynamic_smem));
        Ok(f)
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, HashMap<KernelKey, Arc<CompiledModule>>> {
        // A panic while holding the lock leaves a consistent map (insert is the last step).
        self.modules.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_functions(&self) -> std::sync::MutexGuard<'_, FunctionMap> {
        self.functions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The NVRTC options for `key` on this device.
    pub fn options(&self, key: &KernelKey) -> Vec<String> {
        nvrtc_options(key, self.arch, &self.include_paths)
    }

    /// Compiles `family` for `key` to a cubin (or loads it from the persistent cache);
    /// returns it with NVRTC's log.
    fn compile(&self, family: &KernelFamily, key: &KernelKey) -> Result<(Vec<u8>, String)> {
        let options = self.options(key);
        let compile = || {
            self.compiled.fetch_add(1, Ordering::Relaxed);
            compile_cubin(family, &key.describe(), &options)
        };
        let Some(disk) = &self.disk else {
            return compile();
        };
        let Some(version) = nvrtc_version() else {
            return compile();
        };
        let ckey = cache_key(family.source, HEADERS, &options, version, self.arch);
        let (cubin, log, hit) = disk.get_or_compile(&ckey, compile)?;
        if hit {
            self.disk_hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok((cubin, log))
    }
}

/// NVRTC's version, part of the persistent cache key (a new NVRTC may compile differently).
fn nvrtc_version() -> Option<(i32, i32)> {
    // SAFETY: only queries whether the shared library can be opened.
    if !unsafe { nvrtc::is_culib_present() } {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    let r = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
    (r == nvrtc::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Lets `f` launch with `bytes` of dynamic shared memory (a no-op up to the 48 KiB default).
fn raise_smem(f: &CudaFunction, bytes: usize) -> Result<()> {
    if bytes > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )?;
    }
    Ok(())
}

/// The arch string NVRTC compiles for: `sm_90a` on Hopper (the `a` unlocks wgmma and
/// setmaxnreg), `sm_XY` elsewhere.
pub fn arch_name(arch: (i32, i32)) -> String {
    let (ma, mi) = arch;
    if (ma, mi) == (9, 0) || (ma, mi) == (10, 0) {
        format!("sm_{ma}{mi}a")
    } else {
        format!("sm_{ma}{mi}")
    }
}

/// The NVRTC options for `key` on a device of compute capability `arch`.
pub fn nvrtc_options(key: &KernelKey, arch: (i32, i32), include_paths: &[String]) -> Vec<String> {
    let (ma, mi) = arch;
    let mut o = vec![
        format!("--gpu-architecture={}", arch_name(arch)),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
        // line tables for profilers (ncu source view); no effect on the code
        "-lineinfo".into(),
        format!("-DKEY_ARCH={}", ma * 10 + mi),
        format!("-DKEY_HEAD_DIM={}", key.head_dim),
        format!("-DKEY_BLOCK_SIZE={}", key.block_size),
    ];
    match key.dtype {
        Some(DType::F32) => o.extend(["-DKEY_DTYPE=0".into(), "-DKEY_DTYPE_F32=1".into()]),
        Some(DType::F16) => o.extend(["-DKEY_DTYPE=1".into(), "-DKEY_DTYPE_F16=1".into()]),
        Some(DType::BF16) => o.extend(["-DKEY_DTYPE=2".into(), "-DKEY_DTYPE_BF16=1".into()]),
        None => o.push("-DKEY_DTYPE=-1".into()),
    }
    for (n, v) in &key.defines {
        o.push(format!("-D{n}={v}"));
    }
    for p in include_paths {
        o.push(format!("--include-path={p}"));
    }
    o
}

/// Compiles `family` for `key` and `arch` with NVRTC alone (no driver, no device): checks that
/// a kernel builds and reports its registers and spills (`ptxas -v`), where only
/// libnvrtc is installed. Returns the cubin and NVRTC's log.
pub fn compile_offline(
    family: &KernelFamily,
    key: &KernelKey,
    arch: (i32, i32),
) -> Result<(Vec<u8>, String)> {
    compile_cubin(family, &key.describe(), &nvrtc_options(key, arch, &[]))
}

/// Compiles `family` with `options` to a cubin (NVRTC, no device needed).
fn compile_cubin(
    family: &KernelFamily,
    key: &str,
    options: &[String],
) -> Result<(Vec<u8>, String)> {
    // SAFETY: only queries whether the shared library can be opened.
    if !unsafe { nvrtc::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    let err = |status: nvrtc::nvrtcResult, log: String| CudaError::Compile {
        family: family.name,
        key: key.to_string(),
        options: options.to_vec(),
        status: format!("{status:?}"),
        log,
    };
    let src = CString::new(family.source).map_err(|_| {
        err(
            nvrtc::nvrtcResult::NVRTC_ERROR_INVALID_INPUT,
            "source holds a NUL byte".into(),
        )
    })?;
    let name = CString::new(format!("{}.cu", family.name)).expect("family names hold no NUL");
    let header_src: Vec<CString> = HEADERS
        .iter()
        .map(|(_, s)| CString::new(*s).expect("embedded headers hold no NUL"))
        .collect();
    let header_names: Vec<CString> = HEADERS
        .iter()
        .map(|(n, _)| CString::new(*n).expect("header names hold no NUL"))
        .collect();
    let header_src_ptrs: Vec<*const c_char> = header_src.iter().map(|s| s.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|s| s.as_ptr()).collect();
    let opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).expect("options hold no NUL"))
        .collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();

    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer points into a CString that outlives the program; counts match the
    // arrays; the program is destroyed on every path below.
    unsafe {
        let r = nvrtc::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as i32,
            header_src_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        );
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(err(r, String::new()));
        }
        let compiled = nvrtc::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let log = program_log(prog);
        if compiled != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            nvrtc::nvrtcDestroyProgram(&mut prog);
            return Err(err(compiled, log));
        }
        let mut size = 0usize;
        let r = nvrtc::nvrtcGetCUBINSize(prog, &mut size);
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            nvrtc::nvrtcDestroyProgram(&mut prog);
            return Err(err(r, log));
        }
        let mut cubin = vec![0u8; size];
        let r = nvrtc::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char);
        nvrtc::nvrtcDestroyProgram(&mut prog);
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            return Err(err(r, log));
        }
        Ok((cubin, log))
    }
}

/// # Safety
/// `prog` must be a live NVRTC program.
unsafe fn program_log(prog: nvrtc::nvrtcProgram) -> String {
    let mut size = 0usize;
    if nvrtc::nvrtcGetProgramLogSize(prog, &mut size) != nvrtc::nvrtcResult::NVRTC_SUCCESS
        || size <= 1
    {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    if nvrtc::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char)
        != nvrtc::nvrtcResult::NVRTC_SUCCESS
    {
        return String::new();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
