//! The persistent kernel cache: compiled cubins on disk, so a new process loads its kernels
//! instead of compiling them again with NVRTC (seconds per process otherwise).
//!
//! Where: `$FLEXPREFILL_CACHE_DIR`, else `$XDG_CACHE_HOME/flexprefill`, else
//! `~/.cache/flexprefill`. `FLEXPREFILL_CACHE=0` (or `off`, `false`, `no`) turns it off.
//!
//! An entry is keyed by everything that changes the cubin ([`cache_key`]): the source with the
//! embedded headers (hashed), the NVRTC version, the device's compute capability and every
//! option (defines, arch, include paths). The file name is a 128-bit hash of that key; the file
//! starts with a header holding the whole key and ends with a checksum of its contents, so a
//! truncated, corrupt, stale or colliding entry is detected, recompiled and replaced, never
//! loaded. Writes go to a temporary file renamed into place (atomic on one file system), so a
//! reader never sees half a file. A cache that cannot be read or written is not an error: the
//! kernels are compiled as without it (set `FLEXPREFILL_CACHE_VERBOSE=1` to see why once).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where compiled kernels are kept between processes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KernelCache {
    /// From the environment (see the module docs); the default.
    #[default]
    FromEnv,
    /// No persistent cache: every process compiles its kernels.
    Off,
    /// This folder.
    Dir(PathBuf),
}

impl KernelCache {
    /// The folder this setting resolves to, or `None` when the cache is off (or no folder can
    /// be found: no `HOME` either).
    pub fn resolve(&self) -> Option<PathBuf> {
        self.resolve_with(|k| std::env::var_os(k))
    }

    fn resolve_with(&self, var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
        match self {
            KernelCache::Off => None,
            KernelCache::Dir(d) => Some(d.clone()),
            KernelCache::FromEnv => {
                let env = |k: &str| var(k).filter(|v| !v.is_empty());
                if let Some(v) = env("FLEXPREFILL_CACHE") {
                    let v = v.to_string_lossy().to_ascii_lowercase();
                    if matches!(v.as_str(), "0" | "off" | "false" | "no") {
                        return None;
                    }
                }
                if let Some(d) = env("FLEXPREFILL_CACHE_DIR") {
                    return Some(PathBuf::from(d));
                }
                if let Some(d) = env("XDG_CACHE_HOME") {
                    return Some(PathBuf::from(d).join("flexprefill"));
                }
                env("HOME").map(|h| PathBuf::from(h).join(".cache").join("flexprefill"))
            }
        }
    }
}

/// File magic and layout version.
const MAGIC: &[u8; 8] = b"FPXCUBN1";

/// FNV-1a, 64 bit, from `seed`: stable across processes, platforms and Rust versions (std's
/// hasher promises none of that).
fn fnv64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const SEED_A: u64 = 0xcbf2_9ce4_8422_2325;
const SEED_B: u64 = 0x84222325_cbf29ce4;

/// The cache key of one compilation: every input that changes the cubin, as text.
pub fn cache_key(
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
    nvrtc_version: (i32, i32),
    arch: (i32, i32),
) -> String {
    let mut src = fnv64(SEED_A, source.as_bytes());
    let mut src_b = fnv64(SEED_B, source.as_bytes());
    for (name, text) in headers {
        for part in [name.as_bytes(), &[0], text.as_bytes(), &[0]] {
            src = fnv64(src, part);
            src_b = fnv64(src_b, part);
        }
    }
    let mut k = format!(
        "nvrtc {}.{}\narch {}.{}\nsource {src:016x}{src_b:016x} ({} bytes)\n",
        nvrtc_version.0,
        nvrtc_version.1,
        arch.0,
        arch.1,
        source.len()
    );
    for o in options {
        k.push_str("option ");
        k.push_str(o);
        k.push('\n');
    }
    k
}

/// A cache folder.
#[derive(Debug)]
pub(crate) struct DiskCache {
    dir: PathBuf,
}

fn note(what: &str, path: &Path, err: &dyn std::fmt::Display) {
    static ONCE: AtomicBool = AtomicBool::new(false);
    if std::env::var_os("FLEXPREFILL_CACHE_VERBOSE").is_some_and(|v| v != "0")
        && !ONCE.swap(true, Ordering::Relaxed)
    {
        eprintln!(
            "flexprefill: kernel cache: cannot {what} {}: {err}",
            path.display()
        );
    }
}

impl DiskCache {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!(
            "{:016x}{:016x}.cubin",
            fnv64(SEED_A, key.as_bytes()),
            fnv64(SEED_B, key.as_bytes())
        ))
    }

    /// The entry for `key` (cubin, NVRTC log), or `None` when there is none or it fails any
    /// check.
    pub(crate) fn load(&self, key: &str) -> Option<(Vec<u8>, String)> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        decode(&bytes, key)
    }

    /// Writes the entry; failures are swallowed (the cache is an optimisation).
    pub(crate) fn store(&self, key: &str, cubin: &[u8], log: &str) {
        let path = self.path(key);
        if let Err(e) = self.try_store(&path, &encode(key, cubin, log)) {
            note("write", &path, &e);
        }
    }

    fn try_store(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .map_or("entry".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
        let mut f = std::fs::File::create(&tmp)?;
        let written = f.write_all(bytes).and_then(|_| f.sync_all());
        drop(f);
        if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }

    /// The cached entry for `key`, or `compile()`'s result, stored for the next process.
    /// Returns whether it came from the cache.
    pub(crate) fn get_or_compile<E>(
        &self,
        key: &str,
        compile: impl FnOnce() -> Result<(Vec<u8>, String), E>,
    ) -> Result<(Vec<u8>, String, bool), E> {
        if let Some((cubin, log)) = self.load(key) {
            return Ok((cubin, log, true));
        }
        let (cubin, log) = compile()?;
        self.store(key, &cubin, &log);
        Ok((cubin, log, false))
    }
}

fn encode(key: &str, cubin: &[u8], log: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(cubin.len() + key.len() + log.len() + 40);
    b.extend_from_slice(MAGIC);
    for part in [key.as_bytes(), log.as_bytes(), cubin] {
        b.extend_from_slice(&(part.len() as u64).to_le_bytes());
        b.extend_from_slice(part);
    }
    let sum = fnv64(SEED_A, &b[MAGIC.len()..]);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

fn decode(b: &[u8], key: &str) -> Option<(Vec<u8>, String)> {
    let body = b.strip_prefix(MAGIC)?;
    let (body, sum) = body.split_at(body.len().checked_sub(8)?);
    if fnv64(SEED_A, body).to_le_bytes() != sum {
        return None;
    }
    let mut rest = body;
    let mut parts = Vec::with_capacity(3);
    for _ in 0..3 {
        let (len, r) = rest.split_at_checked(8)?;
        let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
        let (part, r) = r.split_at_checked(len)?;
        parts.push(part);
        rest = r;
    }
    if !rest.is_empty() || parts[0] != key.as_bytes() || parts[2].is_empty() {
        return None;
    }
    let log = String::from_utf8(parts[1].to_vec()).ok()?;
    Some((parts[2].to_vec(), log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn key() -> String {
        cache_key(
            "kernel",
            &[("h.cuh", "header")],
            &["-DX=1".into()],
            (13, 0),
            (9, 0),
        )
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fp-kcache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn key_changes_with_every_input() {
        let base = key();
        let variants = [
            cache_key(
                "kernel2",
                &[("h.cuh", "header")],
                &["-DX=1".into()],
                (13, 0),
                (9, 0),
            ),
            cache_key(
                "kernel",
                &[("h.cuh", "header2")],
                &["-DX=1".into()],
                (13, 0),
                (9, 0),
            ),
            cache_key(
                "kernel",
                &[("g.cuh", "header")],
                &["-DX=1".into()],
                (13, 0),
                (9, 0),
            ),
            cache_key(
                "kernel",
                &[("h.cuh", "header")],
                &["-DX=2".into()],
                (13, 0),
                (9, 0),
            ),
            cache_key("kernel", &[("h.cuh", "header")], &[], (13, 0), (9, 0)),
            cache_key(
                "kernel",
                &[("h.cuh", "header")],
                &["-DX=1".into()],
                (13, 1),
                (9, 0),
            ),
            cache_key(
                "kernel",
                &[("h.cuh", "header")],
                &["-DX=1".into()],
                (13, 0),
                (8, 9),
            ),
        ];
        for v in &variants {
            assert_ne!(&base, v);
        }
        assert_eq!(base, key(), "the key is deterministic");
    }

    #[test]
    fn second_lookup_hits_and_returns_the_same_bytes() {
        let dir = tmpdir("hit");
        let c = DiskCache::new(dir.clone());
        let calls = Cell::new(0);
        let compile = || -> Result<(Vec<u8>, String), ()> {
            calls.set(calls.get() + 1);
            Ok((vec![1, 2, 3, 4], "log".into()))
        };
        let (a, la, hit_a) = c.get_or_compile(&key(), compile).unwrap();
        let (b, lb, hit_b) = c.get_or_compile(&key(), compile).unwrap();
        assert_eq!((hit_a, hit_b, calls.get()), (false, true, 1));
        assert_eq!((a, la), (b, lb));
        // Another key misses.
        let other = key() + "option -DY=1\n";
        assert!(!c.get_or_compile(&other, compile).unwrap().2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn corrupt_truncated_or_foreign_entries_are_recompiled() {
        let dir = tmpdir("corrupt");
        let c = DiskCache::new(dir.clone());
        let compile = || -> Result<(Vec<u8>, String), ()> { Ok((vec![7; 64], String::new())) };
        c.get_or_compile(&key(), compile).unwrap();
        let path = c.path(&key());
        let good = std::fs::read(&path).unwrap();
        assert!(c.load(&key()).is_some());
        // One flipped byte in the cubin.
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 20] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        assert!(c.load(&key()).is_none(), "flipped byte accepted");
        // Truncated.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(c.load(&key()).is_none(), "truncated entry accepted");
        // Empty file.
        std::fs::write(&path, b"").unwrap();
        assert!(c.load(&key()).is_none());
        // A valid entry written for another key under this name (hash collision, stale).
        std::fs::write(&path, encode("another key", &[7; 64], "")).unwrap();
        assert!(c.load(&key()).is_none(), "entry of another key accepted");
        // A corrupt entry is replaced by the recompiled one.
        assert!(!c.get_or_compile(&key(), compile).unwrap().2);
        assert_eq!(std::fs::read(&path).unwrap(), good);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unwritable_dir_is_not_an_error() {
        // A regular file where the folder should be: create_dir_all fails.
        let file = tmpdir("unwritable");
        std::fs::write(&file, b"not a folder").unwrap();
        let c = DiskCache::new(file.join("sub"));
        let (cubin, _, hit) = c
            .get_or_compile(&key(), || -> Result<_, ()> {
                Ok((vec![5; 8], String::new()))
            })
            .unwrap();
        assert_eq!((cubin, hit), (vec![5; 8], false));
        // The compile error itself still comes through.
        let e = c.get_or_compile(&key(), || -> Result<(Vec<u8>, String), &str> {
            Err("boom")
        });
        assert_eq!(e.unwrap_err(), "boom");
        let _ = std::fs::remove_file(file);
    }

    #[test]
    fn resolve_honours_off_dir_and_the_environment() {
        assert_eq!(KernelCache::Off.resolve(), None);
        let d = PathBuf::from("/x/y");
        assert_eq!(KernelCache::Dir(d.clone()).resolve(), Some(d));
        fn env<'a>(
            pairs: &'a [(&'a str, &'a str)],
        ) -> impl Fn(&str) -> Option<std::ffi::OsString> + 'a {
            move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        }
        let e = KernelCache::FromEnv;
        let all = [
            ("FLEXPREFILL_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(e.resolve_with(env(&all[..])), Some("/c".into()));
        assert_eq!(
            e.resolve_with(env(&all[1..])),
            Some("/xdg/flexprefill".into())
        );
        assert_eq!(
            e.resolve_with(env(&all[2..])),
            Some("/home/u/.cache/flexprefill".into())
        );
        assert_eq!(e.resolve_with(env(&[])), None);
        for off in ["0", "off", "OFF", "false"] {
            let pairs = [("FLEXPREFILL_CACHE", off), ("HOME", "/h")];
            assert_eq!(e.resolve_with(env(&pairs)), None, "FLEXPREFILL_CACHE={off}");
        }
        let on = [("FLEXPREFILL_CACHE", "1"), ("HOME", "/h")];
        assert_eq!(
            e.resolve_with(env(&on)),
            Some("/h/.cache/flexprefill".into())
        );
    }
}
