//! NVRTC, chosen explicitly and called through its C API by full path: cudarc loads
//! `libnvrtc` by name, and which copy a name finds depends on the library search order (a
//! PyTorch wheel's newer NVRTC can win, and its output may not load on the machine's driver).
//! The choice: `SCORESTREAM_NVRTC` (a library file) or `SCORESTREAM_NVRTC_LIB` (a folder)
//! first; otherwise every `libnvrtc.so.*` in the usual places, the highest version that does
//! not exceed the driver's CUDA version. Kernels are compiled straight to CUBIN for the
//! device's own architecture, so the driver never JIT-compiles PTX.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::libraries::{dlopen_path, driver_version, python_nvidia_dir, symbol, RTLD_GLOBAL, RTLD_NOW};
use super::CudaError;

type Result<T> = std::result::Result<T, CudaError>;

/// A `libnvrtc.so.*` found on disk, with the version its file names state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub lib: PathBuf,
    /// `(major, minor)` from `libnvrtc-builtins.so.X.Y` beside it or `libnvrtc.so.X.Y.Z`.
    pub version: Option<(i32, i32)>,
}

/// Which NVRTC library file a folder holds and its version, from the folder's file names
/// (`libnvrtc.so.13` + `libnvrtc-builtins.so.13.0` in the pip wheel; `libnvrtc.so.13.0.88` in
/// the toolkit). None when the folder holds no `libnvrtc.so.<major>…`.
pub(crate) fn pick_in_folder(names: &[String]) -> Option<(String, Option<(i32, i32)>)> {
    let parse = |rest: &str| -> Option<(i32, i32)> {
        let mut it = rest.split('.');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    let mut libs: Vec<&String> =
        names.iter().filter(|n| n.strip_prefix("libnvrtc.so.").is_some_and(|r| r.chars().all(|c| c.is_ascii_digit() || c == '.'))).collect();
    // The shortest name is the soname link (`libnvrtc.so.13`): the one a by-name load finds.
    libs.sort_by_key(|n| (n.len(), (*n).clone()));
    let lib = libs.first()?;
    let version = names
        .iter()
        .filter_map(|n| n.strip_prefix("libnvrtc-builtins.so."))
        .find_map(parse)
        .or_else(|| libs.iter().find_map(|n| n.strip_prefix("libnvrtc.so.").and_then(parse)));
    Some(((*lib).clone(), version))
}

/// The candidate to load: the highest version not above `driver` (the driver's CUDA version);
/// without a driver, the highest found. Candidates of unknown version come last.
pub fn choose(candidates: &[Candidate], driver: Option<(i32, i32)>) -> Option<Candidate> {
    let fits = |c: &&Candidate| match (c.version, driver) {
        (Some(v), Some(d)) => v <= d,
        _ => true,
    };
    // The first of equals wins: search order breaks ties.
    candidates.iter().filter(fits).min_by_key(|c| std::cmp::Reverse(c.version.unwrap_or((-1, -1)))).cloned()
}

/// Folders searched for NVRTC, in order: `LD_LIBRARY_PATH`, `$CUDA_HOME`, `/usr/local/cuda*`,
/// the nvidia-* Python wheels, the system library folder.
pub(crate) fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH").map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            dirs.push(PathBuf::from(&h).join("lib64"));
            dirs.push(PathBuf::from(h).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    if let Ok(entries) = std::fs::read_dir("/usr/local") {
        let mut versioned: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("cuda-")))
            .map(|p| p.join("lib64"))
            .collect();
        versioned.sort();
        dirs.extend(versioned);
    }
    if let Some(d) = python_nvidia_dir("lib") {
        dirs.push(d);
    }
    dirs.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    let mut seen = Vec::new();
    dirs.retain(|d| !d.as_os_str().is_empty() && !seen.contains(d) && {
        seen.push(d.clone());
        true
    });
    dirs
}

/// Every NVRTC found in [`search_dirs`].
pub fn candidates() -> Vec<Candidate> {
    search_dirs()
        .into_iter()
        .filter_map(|dir| {
            let names: Vec<String> = std::fs::read_dir(&dir).ok()?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
            let (lib, version) = pick_in_folder(&names)?;
            Some(Candidate { lib: dir.join(lib), version })
        })
        .collect()
}

type Prog = *mut c_void;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type CreateFn = unsafe extern "C" fn(*mut Prog, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> c_int;
type CompileFn = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type SizeFn = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type GetFn = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut Prog) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// One loaded NVRTC library (kept loaded for the process's life).
pub struct Nvrtc {
    pub path: PathBuf,
    pub version: (i32, i32),
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: GetFn,
    cubin_size: SizeFn,
    cubin: GetFn,
    destroy: DestroyFn,
    error_string: ErrorStringFn,
}

/// A compiled program: the CUBIN and NVRTC's log (with ptxas's resource report).
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

fn missing(path: &Path, why: String) -> CudaError {
    CudaError::MissingLibrary { library: "libnvrtc", hint: format!("{}: {why}", path.display()) }
}

impl Nvrtc {
    /// Load the NVRTC at `path`. Its `libnvrtc-builtins` from the same folder is loaded first,
    /// so NVRTC's own by-name load of it finds this copy and not another version's.
    pub fn load(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            if let Ok(entries) = std::fs::read_dir(dir) {
                let mut builtins: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libnvrtc-builtins.so.")))
                    .collect();
                builtins.sort_by_key(|p| p.as_os_str().len());
                if let Some(b) = builtins.first() {
                    let _ = dlopen_path(b, RTLD_NOW | RTLD_GLOBAL);
                }
            }
        }
        let handle = dlopen_path(path, RTLD_NOW | RTLD_GLOBAL).map_err(|e| missing(path, e))?;
        let sym = |name: &str| -> Result<*mut c_void> { symbol(handle, name).map_err(|e| missing(path, e)) };
        // SAFETY: each symbol has the signature of NVRTC's C API (nvrtc.h), stable since CUDA 11.
        let (version, nv) = unsafe {
            let version: VersionFn = std::mem::transmute(sym("nvrtcVersion")?);
            let nv = Self {
                path: path.to_owned(),
                version: (0, 0),
                create: std::mem::transmute::<*mut c_void, CreateFn>(sym("nvrtcCreateProgram")?),
                compile: std::mem::transmute::<*mut c_void, CompileFn>(sym("nvrtcCompileProgram")?),
                log_size: std::mem::transmute::<*mut c_void, SizeFn>(sym("nvrtcGetProgramLogSize")?),
                log: std::mem::transmute::<*mut c_void, GetFn>(sym("nvrtcGetProgramLog")?),
                cubin_size: std::mem::transmute::<*mut c_void, SizeFn>(sym("nvrtcGetCUBINSize")?),
                cubin: std::mem::transmute::<*mut c_void, GetFn>(sym("nvrtcGetCUBIN")?),
                destroy: std::mem::transmute::<*mut c_void, DestroyFn>(sym("nvrtcDestroyProgram")?),
                error_string: std::mem::transmute::<*mut c_void, ErrorStringFn>(sym("nvrtcGetErrorString")?),
            };
            (version, nv)
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters.
        let rc = unsafe { version(&mut major, &mut minor) };
        if rc != 0 {
            return Err(missing(path, format!("nvrtcVersion failed ({rc})")));
        }
        Ok(Self { version: (major, minor), ..nv })
    }

    fn error(&self, rc: c_int) -> String {
        // SAFETY: NVRTC returns a static string for any code.
        let s = unsafe { (self.error_string)(rc) };
        if s.is_null() { format!("NVRTC error {rc}") } else { unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned() }
    }

    /// Compile `src` with `options` to CUBIN. A failed compile returns NVRTC's log.
    pub fn compile_cubin(&self, src: &str, name: &str, options: &[String]) -> std::result::Result<Compiled, String> {
        let src = CString::new(src).map_err(|_| "kernel source holds a NUL byte".to_owned())?;
        let name = CString::new(name).map_err(|_| "program name holds a NUL byte".to_owned())?;
        let opts: Vec<CString> = options.iter().map(|o| CString::new(o.as_str())).collect::<std::result::Result<_, _>>().map_err(|_| "an option holds a NUL byte".to_owned())?;
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: valid C strings; no headers passed in memory.
        let rc = unsafe { (self.create)(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()) };
        if rc != 0 {
            return Err(format!("nvrtcCreateProgram: {}", self.error(rc)));
        }
        // SAFETY: `prog` was created above and is destroyed once, below.
        let result = unsafe { self.compile_created(prog, &ptrs) };
        // SAFETY: as above.
        unsafe { (self.destroy)(&mut prog) };
        result
    }

    unsafe fn compile_created(&self, prog: Prog, ptrs: &[*const c_char]) -> std::result::Result<Compiled, String> {
        let rc = (self.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr());
        let mut size = 0usize;
        let log = if (self.log_size)(prog, &mut size) == 0 && size > 1 {
            let mut buf = vec![0u8; size];
            (self.log)(prog, buf.as_mut_ptr().cast());
            String::from_utf8_lossy(&buf[..size - 1]).into_owned()
        } else {
            String::new()
        };
        if rc != 0 {
            return Err(format!("{}\n{log}", self.error(rc)));
        }
        let mut size = 0usize;
        let rc = (self.cubin_size)(prog, &mut size);
        if rc != 0 || size == 0 {
            return Err(format!("nvrtcGetCUBINSize: {} (was a real sm_XX architecture given?)", self.error(rc)));
        }
        let mut cubin = vec![0u8; size];
        let rc = (self.cubin)(prog, cubin.as_mut_ptr().cast());
        if rc != 0 {
            return Err(format!("nvrtcGetCUBIN: {}", self.error(rc)));
        }
        Ok(Compiled { cubin, log })
    }
}

/// The NVRTC this process uses, chosen and loaded once (see the module doc).
pub fn global() -> Result<&'static Nvrtc> {
    static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    let hint = |e: CudaError| match e {
        CudaError::MissingLibrary { hint, .. } => hint,
        other => other.to_string(),
    };
    NVRTC.get_or_init(|| select().map_err(hint)).as_ref().map_err(|h| CudaError::MissingLibrary { library: "libnvrtc", hint: h.clone() })
}

fn select() -> Result<Nvrtc> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(file) = env("SCORESTREAM_NVRTC") {
        return Nvrtc::load(&file);
    }
    if let Some(dir) = env("SCORESTREAM_NVRTC_LIB") {
        let names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| missing(&dir, e.to_string()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let (lib, _) = pick_in_folder(&names).ok_or_else(|| missing(&dir, "no libnvrtc.so.* in SCORESTREAM_NVRTC_LIB".into()))?;
        return Nvrtc::load(&dir.join(lib));
    }
    let found = candidates();
    let driver = driver_version();
    let pick = choose(&found, driver).ok_or_else(|| CudaError::MissingLibrary {
        library: "libnvrtc",
        hint: format!(
            "no NVRTC at or below the driver's CUDA {driver:?} among {found:?}: pip install \"nvidia-cuda-nvrtc==13.0.*\", \
             set SCORESTREAM_NVRTC to a libnvrtc.so file, or use prebuilt kernels (SCORESTREAM_PREBUILT_KERNELS)"
        ),
    })?;
    Nvrtc::load(&pick.lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_folder_names_the_library_and_its_version() {
        let wheel = names(&["libnvrtc.so.13", "libnvrtc.alt.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc-builtins.alt.so.13.0"]);
        assert_eq!(pick_in_folder(&wheel), Some(("libnvrtc.so.13".into(), Some((13, 0)))));
        let toolkit = names(&["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.13.2.51", "libnvrtc-builtins.so.13.2.51"]);
        assert_eq!(pick_in_folder(&toolkit), Some(("libnvrtc.so.13".into(), Some((13, 2)))));
        assert_eq!(pick_in_folder(&names(&["libnvrtc.so.12.4.99"])), Some(("libnvrtc.so.12.4.99".into(), Some((12, 4)))));
        assert_eq!(pick_in_folder(&names(&["libcublasLt.so.13", "libnvrtc.so"])), None);
    }

    #[test]
    fn the_highest_nvrtc_the_driver_supports_wins() {
        let c = |p: &str, v: Option<(i32, i32)>| Candidate { lib: PathBuf::from(p), version: v };
        let found = [c("/torch/libnvrtc.so.13", Some((13, 2))), c("/wheel/libnvrtc.so.13", Some((13, 0))), c("/old/libnvrtc.so.12", Some((12, 8))), c("/x/libnvrtc.so.13", None)];
        // Driver 580 is CUDA 13.0: NVRTC 13.2 is passed over even though it comes first.
        assert_eq!(choose(&found, Some((13, 0))).map(|c| c.lib), Some(PathBuf::from("/wheel/libnvrtc.so.13")));
        assert_eq!(choose(&found, Some((13, 2))).map(|c| c.lib), Some(PathBuf::from("/torch/libnvrtc.so.13")));
        assert_eq!(choose(&found, Some((12, 9))).map(|c| c.lib), Some(PathBuf::from("/old/libnvrtc.so.12")));
        // No driver (a build machine): the highest found.
        assert_eq!(choose(&found, None).map(|c| c.lib), Some(PathBuf::from("/torch/libnvrtc.so.13")));
        // Only an unversioned one: still used.
        assert_eq!(choose(&found[3..], Some((13, 0))).map(|c| c.lib), Some(PathBuf::from("/x/libnvrtc.so.13")));
        assert_eq!(choose(&found[..1], Some((13, 0))), None);
    }
}
