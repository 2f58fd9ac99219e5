//! The ground floor of the CUDA engine's library handling: `dlopen` by full path, the folders
//! of the nvidia-* Python wheels, whether the driver loads and its CUDA version, and preloading
//! cuBLAS from a folder. Nothing here chooses an NVRTC or compiles a kernel: [`super::nvrtc`]
//! chooses on top of this, [`super::compile`] compiles on top of that, [`super::prebuilt`]
//! stands above both, and [`super::probe`] reports on all of them.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *const c_char;
}

pub(crate) const RTLD_NOW: c_int = 2;
pub(crate) const RTLD_GLOBAL: c_int = 0x100;

/// `dlopen` by full path; the error names the path and dlerror's reason.
pub(crate) fn dlopen_path(path: &Path, flags: c_int) -> Result<*mut c_void, String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| "path holds a NUL byte".to_owned())?;
    // SAFETY: a valid C string; the handle is kept for the process's life.
    let h = unsafe { dlopen(c.as_ptr(), flags) };
    if h.is_null() {
        // SAFETY: dlerror returns null or a C string valid until the next dl* call.
        let e = unsafe { dlerror() };
        return Err(if e.is_null() { "dlopen failed".into() } else { unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned() });
    }
    Ok(h)
}

/// The address of `name` in a library that [`dlopen_path`] opened.
pub(crate) fn symbol(handle: *mut c_void, name: &str) -> Result<*mut c_void, String> {
    let c = CString::new(name).map_err(|_| format!("bad symbol {name}"))?;
    // SAFETY: a handle from dlopen and a valid C string.
    let p = unsafe { dlsym(handle, c.as_ptr()) };
    if p.is_null() { Err(format!("no symbol {name}")) } else { Ok(p) }
}

/// `nvidia/cu13/<sub>` of the pip wheels, asked of `python3` (None when there is none).
pub(crate) fn python_nvidia_dir(sub: &str) -> Option<PathBuf> {
    let code = "import nvidia, os, sys\nfor p in nvidia.__path__:\n    d = os.path.join(p, 'cu13')\n    if os.path.isdir(d):\n        print(d); sys.exit(0)\n";
    let out = std::process::Command::new("python3").args(["-c", code]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!dir.is_empty()).then(|| PathBuf::from(dir).join(sub))
}

/// `probe()`, or false where it panics: cudarc's presence checks panic when a library they
/// load dynamically is missing.
pub(crate) fn never_panics(probe: impl FnOnce() -> bool + std::panic::UnwindSafe) -> bool {
    std::panic::catch_unwind(probe).unwrap_or(false)
}

/// Whether `libcuda` (the driver) can be loaded. Never panics.
pub(crate) fn driver_present() -> bool {
    // SAFETY: this only tries to dlopen the library by name and drops the handle.
    never_panics(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// Whether `libcublasLt` can be loaded by name. Never panics.
pub(crate) fn cublaslt_present() -> bool {
    // SAFETY: as above.
    never_panics(|| unsafe { cudarc::cublaslt::sys::is_culib_present() })
}

/// The driver's CUDA version as `(major, minor)`, when a driver loads.
pub(crate) fn driver_version() -> Option<(i32, i32)> {
    if !driver_present() {
        return None;
    }
    let mut v = 0;
    // SAFETY: one out-parameter; the library was probed above.
    let rc = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (rc == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some((v / 1000, (v % 1000) / 10))
}

/// Load the cuBLAS libraries found in `dir` (e.g. the pip wheels' `nvidia/cu13/lib`) by full
/// path, so that the by-name loads cudarc does later find them even though `dir` is not on
/// `LD_LIBRARY_PATH`. Returns the libraries loaded. (NVRTC is chosen by [`super::nvrtc`].)
pub fn preload_from(dir: &Path) -> Vec<PathBuf> {
    ["libcublasLt.so.13", "libcublas.so.13"]
        .into_iter()
        .map(|name| dir.join(name))
        .filter(|path| path.is_file() && dlopen_path(path, RTLD_NOW | RTLD_GLOBAL).is_ok())
        .collect()
}
