//! fsx-style randomized test: one seeded sequence of file operations is run on files inside the
//! mount and on files in a plain directory on the local disk; every result (return value, errno,
//! bytes read, size afterwards) must be the same on both sides, and at checkpoints the files'
//! contents and sizes must agree between the mount, the plain directory and the NAS directory
//! behind the mount.
//!
//! `ARENAFS_FSX_SEED` picks the seed, `ARENAFS_FSX_OPS` the number of operations, and
//! `ARENAFS_FSX_TRACE=1` prints every operation as it runs (useful when one kills the process,
//! as a `SIGBUS` from a mapping would).

use std::ffi::CString;
use std::fmt;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::util::{Dirs, random_bytes, require_mount};

const MIB: u64 = 1 << 20;
/// Offsets and lengths are drawn so that they often cross multiples of this.
const BOUNDARY: u64 = 4 * MIB;
/// No operation makes a file larger than this.
const MAX_SIZE: u64 = 12 * MIB;
/// Names `loras/f0.safetensors` .. (a cached category, cached at any size with `min_size_mb=0`).
const FILES: usize = 5;
/// Open files whose names are gone (unlinked, renamed over) kept open at most.
const MAX_ORPHANS: usize = 3;
/// Extra read-only descriptors kept open at most.
const MAX_READERS: usize = 2;
/// Operations between two full comparisons of all files.
const CHECK_EVERY: usize = 100;
const DEFAULT_SEED: u64 = 46;
const DEFAULT_OPS: usize = 1500;
/// Operations shown before a mismatch.
const HISTORY: usize = 20;

#[test]
fn random_operations_match_a_plain_directory() {
    require_mount!();
    run("passthrough", &["min_size_mb=0"], false);
}

#[test]
fn random_operations_match_a_plain_directory_without_passthrough() {
    require_mount!();
    run("passthrough=0", &["min_size_mb=0", "passthrough=0"], true);
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// Runs the sequence against a mount with `opts`; `free_readers`: see [`gen_op`].
fn run(variant: &str, opts: &[&str], free_readers: bool) {
    let seed: u64 = env_or("ARENAFS_FSX_SEED", DEFAULT_SEED);
    let ops: usize = env_or("ARENAFS_FSX_OPS", DEFAULT_OPS);
    let trace = std::env::var("ARENAFS_FSX_TRACE").is_ok_and(|v| v == "1");
    eprintln!(
        "fsx[{variant}]: seed {seed}, {ops} operations \
         (ARENAFS_FSX_SEED={seed} ARENAFS_FSX_OPS={ops} to run it again)"
    );
    let started = Instant::now();
    let d = Dirs::new();
    let plain_root = d.tmp.path().join("plain");
    fs::create_dir_all(plain_root.join("loras")).unwrap();
    fs::create_dir_all(d.nas.join("loras")).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    // Three files exist before the mount (so the first reads go through the cache paths), the
    // others are made through it.
    for i in 0..3 {
        let len = rng.random_range(0..=MAX_SIZE) as usize;
        let data = random_bytes(len, rng.random());
        if trace {
            eprintln!("fsx[{variant}] initial {}: {len} bytes", file_name(i));
        }
        fs::write(d.nas.join("loras").join(file_name(i)), &data).unwrap();
        fs::write(plain_root.join("loras").join(file_name(i)), &data).unwrap();
    }

    let m = d.mount(opts);
    let mut run = Run {
        variant: variant.to_string(),
        seed,
        log: m.log.clone(),
        history: Vec::new(),
    };
    let nas = d.nas.join("loras");
    // Declared after the mount: dropped (closed) before it is unmounted, also on a panic.
    let mut plain = Side::new(plain_root.join("loras"));
    let mut mnt = Side::new(m.path("loras"));
    let mut slow: Vec<(usize, Duration)> = Vec::new();

    for i in 0..ops {
        let op = gen_op(&mut rng, &plain, free_readers);
        if trace {
            eprintln!("fsx[{variant}] #{i}: {op:?}");
        }
        run.history.push(op.clone());
        let data = op.payload();
        let expected = plain.apply(&op, &data);
        // fallocate modes the local disk does not support are skipped.
        let got = if matches!(op, Op::Fallocate { .. })
            && expected.first_err() == Some(libc::EOPNOTSUPP)
        {
            expected.clone()
        } else {
            let t = Instant::now();
            let got = mnt.apply(&op, &data);
            if t.elapsed() > Duration::from_secs(1) {
                slow.push((i, t.elapsed()));
            }
            got
        };
        if got != expected {
            run.fail(
                i,
                &format!(
                    "operation {op:?}\n  plain directory: {expected:?}\n  arenafs mount:   {got:?}{}",
                    bytes_diff(&expected, &got)
                ),
            );
        }
        if (i + 1) % CHECK_EVERY == 0 {
            run.checkpoint(i, &plain, &mnt, &nas);
        }
    }
    run.checkpoint(ops, &plain, &mnt, &nas);
    plain.close_all();
    mnt.close_all();
    run.checkpoint(ops, &plain, &mnt, &nas);

    let st = m.stats();
    eprintln!(
        "fsx[{variant}]: {ops} operations in {:.1?}; opens: {} passthrough, {} ssd, {} filling, \
         {} nas, {} write; {} copies completed",
        started.elapsed(),
        st.opens_passthrough,
        st.opens_ssd,
        st.opens_filling,
        st.opens_nas,
        st.opens_write,
        st.copies_completed,
    );
    for (i, t) in &slow {
        eprintln!("fsx[{variant}]: operation #{i} took {t:.1?} on the mount");
    }
    drop(mnt);
    drop(plain);
    let mut m = m;
    assert!(m.unmount().success(), "daemon exit status:\n{}", m.log());
    // What the mount wrote is on the NAS after the daemon is gone.
    for f in 0..FILES {
        let want = read_path(&plain_root.join("loras").join(file_name(f)));
        let on_nas = read_path(&nas.join(file_name(f)));
        if want != on_nas {
            run.fail(
                ops,
                &format!(
                    "after unmount, {}: plain directory {want:?}, NAS {on_nas:?}{}",
                    file_name(f),
                    bytes_diff(&want, &on_nas)
                ),
            );
        }
    }
}

fn file_name(i: usize) -> String {
    format!("f{i}.safetensors")
}

/// Which open file an operation works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The open file of name `i` (the one opened under that name, or renamed to it).
    Slot(usize),
    /// An open file whose name is gone, by age.
    Orphan(usize),
    /// A second descriptor, read-only, by age.
    Reader(usize),
}

/// How a file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    ReadOnly,
    WriteOnly,
    ReadWrite,
    /// `O_RDWR | O_APPEND`.
    Append,
}

impl Mode {
    fn flags(self) -> i32 {
        match self {
            Mode::ReadOnly => libc::O_RDONLY,
            Mode::WriteOnly => libc::O_WRONLY,
            Mode::ReadWrite => libc::O_RDWR,
            Mode::Append => libc::O_RDWR | libc::O_APPEND,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// `pwrite` of `len` bytes of `pattern(len, seed)`.
    Pwrite {
        t: Target,
        off: u64,
        len: usize,
        seed: u64,
    },
    Pread {
        t: Target,
        off: u64,
        len: usize,
    },
    /// `write` at the end: on an `O_APPEND` file as is, else after `lseek(SEEK_END)`.
    Append {
        t: Target,
        len: usize,
        seed: u64,
    },
    Ftruncate {
        t: Target,
        len: u64,
    },
    /// Mode 0, or `FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE` (`punch`).
    Fallocate {
        t: Target,
        punch: bool,
        off: u64,
        len: u64,
    },
    /// `fsync`, or `fdatasync` (`data_only`).
    Sync {
        t: Target,
        data_only: bool,
    },
    /// `mmap(PROT_READ, MAP_SHARED)` of the range, copied out.
    MmapRead {
        t: Target,
        off: u64,
        len: usize,
    },
    /// `mmap(PROT_READ | PROT_WRITE, MAP_SHARED)`, the bytes stored, `msync(MS_SYNC)`,
    /// `munmap`, then a `pread` of the range.
    MmapWrite {
        t: Target,
        off: u64,
        len: usize,
        seed: u64,
    },
    CopyFileRange {
        from: Target,
        from_off: u64,
        to: Target,
        to_off: u64,
        len: usize,
    },
    Close {
        file: usize,
    },
    /// Closes the name's open file if any, then opens it.
    Open {
        file: usize,
        mode: Mode,
        create: bool,
        trunc: bool,
    },
    Unlink {
        file: usize,
    },
    /// `unlink`, then `open(O_CREAT | O_EXCL)` and a `write` of `len` bytes.
    Recreate {
        file: usize,
        mode: Mode,
        len: usize,
        seed: u64,
    },
    /// `rename`, then the whole file read under its new name.
    Rename {
        from: usize,
        to: usize,
    },
    /// Opens a second, read-only descriptor of the name (closing the oldest beyond
    /// [`MAX_READERS`]).
    OpenReader {
        file: usize,
    },
    CloseReader {
        i: usize,
    },
    /// The whole file through a fresh `O_RDONLY` open.
    ReadWhole {
        file: usize,
    },
}

impl Op {
    /// The bytes the operation writes.
    fn payload(&self) -> Vec<u8> {
        match *self {
            Op::Pwrite { len, seed, .. }
            | Op::Append { len, seed, .. }
            | Op::MmapWrite { len, seed, .. }
            | Op::Recreate { len, seed, .. } => pattern(len, seed),
            _ => Vec::new(),
        }
    }
}

/// `len` pseudo-random bytes from `seed` (splitmix64: cheap enough for an unoptimized build).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len.next_multiple_of(8)];
    let mut x = seed;
    for word in v.chunks_exact_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// What an operation returned.
#[derive(Clone, PartialEq)]
enum Out {
    Val(i64),
    Bytes(Vec<u8>),
    Err(i32),
    Note(String),
    Seq(Vec<Out>),
}

impl Out {
    fn first_err(&self) -> Option<i32> {
        match self {
            Out::Err(e) => Some(*e),
            Out::Seq(v) => v.iter().find_map(Out::first_err),
            _ => None,
        }
    }
}

impl fmt::Debug for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Out::Val(v) => write!(f, "{v}"),
            Out::Bytes(b) => write!(f, "{} bytes (fnv {:016x})", b.len(), fnv(b)),
            Out::Err(e) => write!(f, "Err({})", errno_name(*e)),
            Out::Note(s) => write!(f, "{s}"),
            Out::Seq(v) => f.debug_list().entries(v).finish(),
        }
    }
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::ENOENT => "ENOENT",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ETXTBSY => "ETXTBSY",
        libc::EIO => "EIO",
        libc::ESTALE => "ESTALE",
        libc::EPERM => "EPERM",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        _ => "",
    };
    format!("{name} {e}: {}", std::io::Error::from_raw_os_error(e))
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Where two results' byte strings first differ, if both hold bytes.
fn bytes_diff(a: &Out, b: &Out) -> String {
    fn bytes(o: &Out) -> Vec<&Vec<u8>> {
        match o {
            Out::Bytes(b) => vec![b],
            Out::Seq(v) => v.iter().flat_map(bytes).collect(),
            _ => vec![],
        }
    }
    let mut s = String::new();
    for (x, y) in bytes(a).into_iter().zip(bytes(b)) {
        if x == y {
            continue;
        }
        match x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            Some(at) => {
                let end = x.len().min(y.len());
                let run = (at..end).take_while(|&k| x[k] != y[k]).count();
                let zeros = y[at..at + run].iter().all(|&c| c == 0);
                s += &format!(
                    "\n  bytes first differ at {at} (0x{at:x}) for {run} bytes (second side all zero there: {zeros}); lengths {} vs {}",
                    x.len(),
                    y.len()
                );
            }
            None => {
                s += &format!(
                    "\n  one is a prefix of the other; lengths {} vs {}",
                    x.len(),
                    y.len()
                )
            }
        }
    }
    s
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A system call's return value, or its errno.
fn sys(r: i64) -> Out {
    if r < 0 {
        Out::Err(last_errno())
    } else {
        Out::Val(r)
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn fd_size(fd: RawFd) -> Result<u64, i32> {
    // SAFETY: `st` is plain old data, filled by `fstat` on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(last_errno());
    }
    Ok(st.st_size as u64)
}

fn fs_ino(fd: RawFd) -> Option<u64> {
    // SAFETY: `st` is plain old data, filled by `fstat` on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a stat buffer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

fn size_out(fd: RawFd) -> Out {
    match fd_size(fd) {
        Ok(n) => Out::Note(format!("size {n}")),
        Err(e) => Out::Err(e),
    }
}

fn pread_out(fd: RawFd, off: u64, len: usize) -> Out {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` has room for `len` bytes.
    let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, off as libc::off_t) };
    if r < 0 {
        return Out::Err(last_errno());
    }
    buf.truncate(r as usize);
    Out::Bytes(buf)
}

/// A whole file through its descriptor, with `pread` calls.
fn read_fd(fd: RawFd) -> Out {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // SAFETY: `buf` has room for its length.
        let r = unsafe {
            libc::pread(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                all.len() as libc::off_t,
            )
        };
        if r < 0 {
            return Out::Err(last_errno());
        }
        if r == 0 {
            return Out::Bytes(all);
        }
        all.extend_from_slice(&buf[..r as usize]);
    }
}

fn read_path(p: &Path) -> Out {
    match fs::read(p) {
        Ok(b) => Out::Bytes(b),
        Err(e) => Out::Err(e.raw_os_error().unwrap_or(-1)),
    }
}

fn page_size() -> u64 {
    // SAFETY: plain system call.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// A shared mapping, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, off: u64, len: usize, prot: i32) -> Result<Self, i32> {
        // SAFETY: a fresh mapping chosen by the kernel; nothing else refers to that memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                off as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_errno());
        }
        Ok(Self { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes, inside the file (checked by the caller).
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, mapped writable by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

struct Handle {
    fd: OwnedFd,
    mode: Mode,
}

/// One side of the comparison: a directory and the files opened in it.
struct Side {
    dir: PathBuf,
    slots: Vec<Option<Handle>>,
    orphans: Vec<Handle>,
    /// Second descriptors (`O_RDONLY`) of named files, opened beside the slots'.
    readers: Vec<Handle>,
}

impl Side {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            slots: (0..FILES).map(|_| None).collect(),
            orphans: Vec::new(),
            readers: Vec::new(),
        }
    }

    fn path(&self, file: usize) -> PathBuf {
        self.dir.join(file_name(file))
    }

    fn handle(&self, t: Target) -> Option<&Handle> {
        match t {
            Target::Slot(i) => self.slots[i].as_ref(),
            Target::Orphan(i) => self.orphans.get(i),
            Target::Reader(i) => self.readers.get(i),
        }
    }

    fn targets(&self) -> Vec<Target> {
        let slots = (0..FILES)
            .filter(|&i| self.slots[i].is_some())
            .map(Target::Slot);
        slots
            .chain((0..self.orphans.len()).map(Target::Orphan))
            .chain((0..self.readers.len()).map(Target::Reader))
            .collect()
    }

    fn size(&self, t: Target) -> u64 {
        self.handle(t)
            .and_then(|h| fd_size(h.fd.as_raw_fd()).ok())
            .unwrap_or(0)
    }

    fn orphan(&mut self, h: Option<Handle>) {
        if let Some(h) = h {
            self.orphans.push(h);
        }
        while self.orphans.len() > MAX_ORPHANS {
            self.orphans.remove(0);
        }
    }

    fn close_all(&mut self) {
        for s in &mut self.slots {
            *s = None;
        }
        self.orphans.clear();
        self.readers.clear();
    }

    /// Whether a descriptor open for writing refers to the file now named `file`.
    fn written(&self, file: usize) -> bool {
        let Ok(named) = fs::metadata(self.path(file)) else {
            return false;
        };
        self.slots.iter().flatten().any(|h| {
            h.mode != Mode::ReadOnly
                && fs_ino(h.fd.as_raw_fd()) == Some(std::os::unix::fs::MetadataExt::ino(&named))
        })
    }

    fn open(&self, file: usize, mode: Mode, extra: i32) -> Result<Handle, i32> {
        let flags = mode.flags() | extra | libc::O_CLOEXEC;
        let p = cpath(&self.path(file));
        // SAFETY: a valid path; the mode argument is read only with O_CREAT.
        let fd = unsafe { libc::open(p.as_ptr(), flags, 0o644 as libc::c_uint) };
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: a descriptor just opened and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Handle { fd, mode })
    }

    /// Runs `op`; `data` is its [`Op::payload`].
    fn apply(&mut self, op: &Op, data: &[u8]) -> Out {
        let no_fd = || Out::Note("no such open file".into());
        match *op {
            Op::Pwrite { t, off, len, .. } => {
                let Some(h) = self.handle(t) else {
                    return no_fd();
                };
                let fd = h.fd.as_raw_fd();
                // SAFETY: `data` holds `len` bytes.
                let r = unsafe { libc::pwrite(fd, data.as_ptr().cast(), len, off as libc::off_t) };
                Out::Seq(vec![sys(r as i64), size_out(fd)])
            }
            Op::Pread { t, off, len } => match self.handle(t) {
                Some(h) => pread_out(h.fd.as_raw_fd(), off, len),
                None => no_fd(),
            },
            Op::Append { t, len, .. } => {
                let Some(h) = self.handle(t) else {
                    return no_fd();
                };
                let fd = h.fd.as_raw_fd();
                let mut outs = Vec::new();
                if h.mode != Mode::Append {
                    // SAFETY: plain system call.
                    outs.push(sys(unsafe { libc::lseek(fd, 0, libc::SEEK_END) }));
                }
                // SAFETY: `data` holds `len` bytes.
                let r = unsafe { libc::write(fd, data.as_ptr().cast(), len) };
                outs.push(sys(r as i64));
                outs.push(size_out(fd));
                Out::Seq(outs)
            }
            Op::Ftruncate { t, len } => {
                let Some(h) = self.handle(t) else {
                    return no_fd();
                };
                let fd = h.fd.as_raw_fd();
                // SAFETY: plain system call.
                let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
                Out::Seq(vec![sys(r as i64), size_out(fd)])
            }
            Op::Fallocate { t, punch, off, len } => {
                let Some(h) = self.handle(t) else {
                    return no_fd();
                };
                let fd = h.fd.as_raw_fd();
                let mode = match punch {
                    true => libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
                    false => 0,
                };
                // SAFETY: plain system call.
                let r =
                    unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) };
                Out::Seq(vec![sys(r as i64), size_out(fd)])
            }
            Op::Sync { t, data_only } => {
                let Some(h) = self.handle(t) else {
                    return no_fd();
                };
                let fd = h.fd.as_raw_fd();
                // SAFETY: plain system calls.
                let r = unsafe {
                    match data_only {
                        true => libc::fdatasync(fd),
                        false => libc::fsync(fd),
                    }
                };
                sys(r as i64)
            }
            Op::MmapRead { t, off, len } => {
                let Some(h) = self.handle(t) else {
                    return no_fd();
                };
                let fd = h.fd.as_raw_fd();
                // Touching a mapping past the end of the file is a SIGBUS: check the size first.
                match fd_size(fd) {
                    Ok(size) if off + len as u64 <= size => {}
                    Ok(size) => return Out::Note(format!("range past the end (size {size})")),
                    Err(e) => return Out::Err(e),
                }
                match Mapping::new(fd, off, len, libc::PROT_READ) {
                    Ok(map) => Out::Bytes(map.bytes().to_vec()),
                    Err(e) => Out::Err(e),
                }
            }
            Op::MmapWrite { t, off, len, .. } => {
                let Some(h) = self.handle(t) else {
                    return no_fd();
                };
                let fd = h.fd.as_raw_fd();
                match fd_size(fd) {
                    Ok(size) if off + len as u64 <= size => {}
                    Ok(size) => return Out::Note(format!("range past the end (size {size})")),
                    Err(e) => return Out::Err(e),
                }
                let mut map = match Mapping::new(fd, off, len, libc::PROT_READ | libc::PROT_WRITE) {
                    Ok(map) => map,
                    Err(e) => return Out::Err(e),
                };
                map.bytes_mut().copy_from_slice(data);
                // SAFETY: the mapping's own address and length.
                let r = unsafe { libc::msync(map.ptr, map.len, libc::MS_SYNC) };
                let synced = sys(r as i64);
                drop(map);
                let back = pread_out(fd, off, len);
                let same = Out::Note(format!(
                    "read back as written: {}",
                    back == Out::Bytes(data.to_vec())
                ));
                Out::Seq(vec![synced, back, same, size_out(fd)])
            }
            Op::CopyFileRange {
                from,
                from_off,
                to,
                to_off,
                len,
            } => {
                let (Some(i), Some(o)) = (self.handle(from), self.handle(to)) else {
                    return no_fd();
                };
                let (fi, fo) = (i.fd.as_raw_fd(), o.fd.as_raw_fd());
                let mut oi = from_off as libc::off64_t;
                let mut oo = to_off as libc::off64_t;
                // SAFETY: valid descriptors and offset pointers.
                let r = unsafe { libc::copy_file_range(fi, &mut oi, fo, &mut oo, len, 0) };
                Out::Seq(vec![sys(r as i64), size_out(fo)])
            }
            Op::Close { file } => match self.slots[file].take() {
                Some(h) => {
                    // SAFETY: `into_raw_fd` gives up ownership; `close` takes it.
                    let r = unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(h.fd)) };
                    sys(r as i64)
                }
                None => no_fd(),
            },
            Op::Open {
                file,
                mode,
                create,
                trunc,
            } => {
                self.slots[file] = None;
                let mut flags = 0;
                if create {
                    flags |= libc::O_CREAT;
                }
                if trunc {
                    flags |= libc::O_TRUNC;
                }
                match self.open(file, mode, flags) {
                    Ok(h) => {
                        let size = size_out(h.fd.as_raw_fd());
                        self.slots[file] = Some(h);
                        Out::Seq(vec![Out::Note("opened".into()), size])
                    }
                    Err(e) => Out::Err(e),
                }
            }
            Op::Unlink { file } => {
                let r = fs::remove_file(self.path(file));
                match r {
                    Ok(()) => {
                        let h = self.slots[file].take();
                        self.orphan(h);
                        Out::Val(0)
                    }
                    Err(e) => Out::Err(e.raw_os_error().unwrap_or(-1)),
                }
            }
            Op::Recreate {
                file, mode, len, ..
            } => {
                let mut outs = vec![self.apply(&Op::Unlink { file }, &[])];
                match self.open(file, mode, libc::O_CREAT | libc::O_EXCL) {
                    Ok(h) => {
                        let fd = h.fd.as_raw_fd();
                        // SAFETY: `data` holds `len` bytes.
                        let r = unsafe { libc::write(fd, data.as_ptr().cast(), len) };
                        outs.push(sys(r as i64));
                        outs.push(size_out(fd));
                        let old = self.slots[file].replace(h);
                        self.orphan(old);
                    }
                    Err(e) => outs.push(Out::Err(e)),
                }
                Out::Seq(outs)
            }
            Op::Rename { from, to } => match fs::rename(self.path(from), self.path(to)) {
                Ok(()) => {
                    let replaced = self.slots[to].take();
                    self.slots[to] = self.slots[from].take();
                    self.orphan(replaced);
                    // The file under its new name, through a fresh open.
                    Out::Seq(vec![Out::Val(0), read_path(&self.path(to))])
                }
                Err(e) => Out::Err(e.raw_os_error().unwrap_or(-1)),
            },
            Op::OpenReader { file } => match self.open(file, Mode::ReadOnly, 0) {
                Ok(h) => {
                    let size = size_out(h.fd.as_raw_fd());
                    self.readers.push(h);
                    if self.readers.len() > MAX_READERS {
                        self.readers.remove(0);
                    }
                    Out::Seq(vec![Out::Note("opened".into()), size])
                }
                Err(e) => Out::Err(e),
            },
            Op::CloseReader { i } => match i < self.readers.len() {
                true => {
                    let h = self.readers.remove(i);
                    // SAFETY: `into_raw_fd` gives up ownership; `close` takes it.
                    let r = unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(h.fd)) };
                    sys(r as i64)
                }
                false => no_fd(),
            },
            Op::ReadWhole { file } => read_path(&self.path(file)),
        }
    }
}

/// An offset for a file of `size` bytes: often near a multiple of [`BOUNDARY`] or near the end.
fn offset(rng: &mut StdRng, size: u64) -> u64 {
    let off = match rng.random_range(0..10) {
        0..=2 => {
            let k = rng.random_range(1..=MAX_SIZE / BOUNDARY - 1);
            let delta = rng.random_range(0..=64 * 1024);
            match rng.random_bool(0.5) {
                true => k * BOUNDARY + delta,
                false => k * BOUNDARY - delta,
            }
        }
        3..=4 => size.saturating_sub(rng.random_range(0..=64 * 1024)) + rng.random_range(0..=4096),
        _ => rng.random_range(0..=size),
    };
    off.min(MAX_SIZE)
}

/// A length: mostly small, sometimes large enough to cross several boundaries.
fn length(rng: &mut StdRng) -> usize {
    let max = match rng.random_range(0..10) {
        0..=5 => 64 * 1024,
        6..=8 => MIB,
        _ => 5 * MIB,
    };
    rng.random_range(1..=max as usize)
}

/// A length for writing at `off` that keeps the file within [`MAX_SIZE`] (at least 1).
fn write_length(rng: &mut StdRng, off: u64) -> usize {
    (length(rng) as u64)
        .min(MAX_SIZE.saturating_sub(off))
        .max(1) as usize
}

fn any_mode(rng: &mut StdRng) -> Mode {
    match rng.random_range(0..20) {
        0..=6 => Mode::ReadOnly,
        7..=8 => Mode::WriteOnly,
        9..=15 => Mode::ReadWrite,
        _ => Mode::Append,
    }
}

fn writable_mode(rng: &mut StdRng) -> Mode {
    match rng.random_range(0..4) {
        0 => Mode::WriteOnly,
        1 => Mode::Append,
        _ => Mode::ReadWrite,
    }
}

/// Operations drawn below this need an open file.
const NEED_FD: u32 = 67;

/// The next operation, drawn from the plain side's state (its sizes and open files).
///
/// With `free_readers` false, a second descriptor is opened only beside a descriptor open for
/// writing on the same file. A read-only descriptor of a complete copy reads it through kernel
/// passthrough, and a write open then waits up to 10 s for it and fails with `ETXTBSY`
/// (docs/design-choices.md, "Write-through"); a reader opened while a writer is open keeps the
/// inode off the SSD copy until it closes.
fn gen_op(rng: &mut StdRng, s: &Side, free_readers: bool) -> Op {
    let targets = s.targets();
    let file = rng.random_range(0..FILES);
    let mut pick = rng.random_range(0..104);
    if targets.is_empty() && pick < NEED_FD {
        pick = NEED_FD; // nothing open: open something
    }
    let t = if targets.is_empty() {
        Target::Slot(0)
    } else {
        targets[rng.random_range(0..targets.len())]
    };
    let size = s.size(t);
    match pick {
        0..16 => {
            let off = offset(rng, size);
            Op::Pwrite {
                t,
                off,
                len: write_length(rng, off),
                seed: rng.random(),
            }
        }
        16..26 => Op::Pread {
            t,
            off: offset(rng, size),
            len: length(rng),
        },
        26..31 => Op::Append {
            t,
            len: write_length(rng, size),
            seed: rng.random(),
        },
        31..37 => {
            let len = match rng.random_range(0..6) {
                0 => 0,
                1 => size.saturating_sub(rng.random_range(1..=64 * 1024)),
                2 => size + rng.random_range(1..=64 * 1024),
                _ => offset(rng, size),
            };
            Op::Ftruncate {
                t,
                len: len.min(MAX_SIZE),
            }
        }
        37..43 => {
            let off = offset(rng, size);
            Op::Fallocate {
                t,
                punch: rng.random_bool(0.5),
                off,
                len: write_length(rng, off) as u64,
            }
        }
        43..47 => Op::Sync {
            t,
            data_only: rng.random_bool(0.5),
        },
        47..61 if size == 0 => Op::ReadWhole { file },
        47..54 => {
            let page = page_size();
            let off = offset(rng, size).min(size - 1) / page * page;
            Op::MmapRead {
                t,
                off,
                len: (length(rng) as u64).min(size - off) as usize,
            }
        }
        54..61 => {
            let page = page_size();
            let off = offset(rng, size).min(size - 1) / page * page;
            Op::MmapWrite {
                t,
                off,
                len: (length(rng) as u64).min(size - off) as usize,
                seed: rng.random(),
            }
        }
        61..NEED_FD => {
            let to = targets[rng.random_range(0..targets.len())];
            let to_off = offset(rng, s.size(to));
            Op::CopyFileRange {
                from: t,
                from_off: offset(rng, size),
                to,
                to_off,
                len: write_length(rng, to_off),
            }
        }
        NEED_FD..79 => {
            let exists = s.path(file).exists();
            Op::Open {
                file,
                mode: any_mode(rng),
                create: rng.random_bool(if exists { 0.2 } else { 0.8 }),
                trunc: rng.random_bool(0.03),
            }
        }
        79..82 if s.slots[file].is_some() => Op::Close { file },
        79..85 => Op::Recreate {
            file,
            mode: writable_mode(rng),
            len: match rng.random_bool(0.2) {
                true => 0,
                false => write_length(rng, 0),
            },
            seed: rng.random(),
        },
        85..87 => Op::Unlink { file },
        87..92 => {
            let to = (file + rng.random_range(1..FILES)) % FILES;
            Op::Rename { from: file, to }
        }
        92..96 if free_readers || s.written(file) => Op::OpenReader { file },
        96..98 if !s.readers.is_empty() => Op::CloseReader {
            i: rng.random_range(0..s.readers.len()),
        },
        _ => Op::ReadWhole { file },
    }
}

/// The run's record, to report a mismatch.
struct Run {
    variant: String,
    seed: u64,
    log: PathBuf,
    history: Vec<Op>,
}

impl Run {
    fn fail(&self, i: usize, what: &str) -> ! {
        let mut msg = format!(
            "fsx[{}]: mismatch at operation #{i} (seed {}; ARENAFS_FSX_SEED={} ARENAFS_FSX_OPS={} \
             runs it again)\n{what}\nlast operations:\n",
            self.variant,
            self.seed,
            self.seed,
            i + 1
        );
        let from = self.history.len().saturating_sub(HISTORY);
        for (j, op) in self.history.iter().enumerate().skip(from) {
            msg += &format!("  #{j}: {op:?}\n");
        }
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        msg += "daemon log (end):\n";
        for l in &lines[lines.len().saturating_sub(30)..] {
            msg += &format!("  {l}\n");
        }
        panic!("{msg}");
    }

    /// Compares every file by name (mount, plain directory, NAS) and every open file's size and
    /// content through its descriptor.
    fn checkpoint(&self, i: usize, plain: &Side, mnt: &Side, nas: &Path) {
        for f in 0..FILES {
            let want = read_path(&plain.path(f));
            let got = read_path(&mnt.path(f));
            if got != want {
                self.fail(
                    i,
                    &format!(
                        "checkpoint: {} read by name: plain directory {want:?}, mount {got:?}{}",
                        file_name(f),
                        bytes_diff(&want, &got)
                    ),
                );
            }
            let on_nas = read_path(&nas.join(file_name(f)));
            if on_nas != got {
                self.fail(
                    i,
                    &format!(
                        "checkpoint: {}: mount {got:?}, NAS {on_nas:?}{}",
                        file_name(f),
                        bytes_diff(&got, &on_nas)
                    ),
                );
            }
        }
        for t in plain.targets() {
            let (Some(p), Some(m)) = (plain.handle(t), mnt.handle(t)) else {
                self.fail(i, &format!("checkpoint: {t:?} open on one side only"));
            };
            let (pfd, mfd) = (p.fd.as_raw_fd(), m.fd.as_raw_fd());
            let (want, got) = (size_out(pfd), size_out(mfd));
            if want != got {
                self.fail(
                    i,
                    &format!("checkpoint: fstat of {t:?}: plain {want:?}, mount {got:?}"),
                );
            }
            let (want, got) = (read_fd(pfd), read_fd(mfd));
            if want != got {
                self.fail(
                    i,
                    &format!(
                        "checkpoint: content of {t:?} through its descriptor: plain {want:?}, mount {got:?}{}",
                        bytes_diff(&want, &got)
                    ),
                );
            }
        }
    }
}
