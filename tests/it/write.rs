//! Write-through: changes made through the mount land on the NAS, as the calling user, with the
//! NAS's error codes, and the cache never serves a copy of what was changed.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::{CHUNK, Dirs, Mounted, random_bytes, require_mount, sh_as, wait_for};

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.unwrap_err().raw_os_error().unwrap()
}

fn entries(m: &Mounted) -> u64 {
    m.status()["cache_entries"].as_u64().unwrap()
}

/// The paths with a cache copy (a dry-run trim of everything lists them).
fn cached(m: &Mounted) -> Vec<String> {
    let r = arenafs::control::client::call(
        &m.socket,
        "POST",
        "/arena/trim",
        Some(&serde_json::json!({"to_bytes": 0, "dry_run": true})),
    )
    .unwrap();
    let mut v: Vec<String> = r["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn every_change_lands_on_the_nas() {
    require_mount!();
    let d = Dirs::new();
    d.nas_file("loras/keep.safetensors", 100, 1);
    let m = d.mount(&["min_size_mb=0"]);
    let (mp, nas) = (|p: &str| m.path(p), |p: &str| d.nas.join(p));

    // create, write, append, read back
    fs::write(mp("loras/new.bin"), b"hello").unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(mp("loras/new.bin"))
        .unwrap();
    f.write_all(b" world").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(nas("loras/new.bin")).unwrap(), b"hello world");
    assert_eq!(fs::read(mp("loras/new.bin")).unwrap(), b"hello world");
    // O_EXCL on an existing file
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(mp("loras/new.bin"))
        ),
        libc::EEXIST
    );

    // pwrite in the middle, truncate, fallocate
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mp("loras/new.bin"))
        .unwrap();
    f.write_all_at(b"HELLO", 0).unwrap();
    f.set_len(5).unwrap();
    // SAFETY: a valid fd.
    assert_eq!(
        unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 4096) },
        0
    );
    f.sync_data().unwrap();
    drop(f);
    let on_nas = fs::read(nas("loras/new.bin")).unwrap();
    assert_eq!(on_nas.len(), 4096);
    assert_eq!(&on_nas[..5], b"HELLO");
    assert_eq!(fs::read(mp("loras/new.bin")).unwrap(), on_nas);

    // directories, with the NAS's errors
    fs::create_dir_all(mp("a/b/c")).unwrap();
    assert!(nas("a/b/c").is_dir());
    assert_eq!(errno(fs::create_dir(mp("a/b"))), libc::EEXIST);
    assert_eq!(errno(fs::remove_dir(mp("a"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_file(mp("a/nothing"))), libc::ENOENT);
    assert_eq!(errno(fs::remove_file(mp("a/b"))), libc::EISDIR);
    fs::remove_dir(mp("a/b/c")).unwrap();
    assert!(!nas("a/b/c").exists());

    // symlink, hard link
    std::os::unix::fs::symlink("../loras/new.bin", mp("a/link")).unwrap();
    assert_eq!(
        fs::read_link(nas("a/link")).unwrap(),
        Path::new("../loras/new.bin")
    );
    assert_eq!(fs::read(mp("a/link")).unwrap().len(), 4096);
    fs::hard_link(mp("loras/new.bin"), mp("a/hard")).unwrap();
    assert_eq!(fs::metadata(nas("loras/new.bin")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(mp("a/hard")).unwrap().ino(),
        fs::metadata(mp("loras/new.bin")).unwrap().ino()
    );

    // rename: plain, over an existing file, RENAME_NOREPLACE, RENAME_EXCHANGE
    fs::write(mp("a/x"), b"x").unwrap();
    fs::write(mp("a/y"), b"y").unwrap();
    fs::rename(mp("a/x"), mp("a/y")).unwrap();
    assert_eq!(fs::read(nas("a/y")).unwrap(), b"x");
    assert!(!nas("a/x").exists());
    fs::write(mp("a/z"), b"z").unwrap();
    let noreplace = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &mp("a/z"),
        nix::fcntl::AT_FDCWD,
        &mp("a/y"),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    );
    assert_eq!(noreplace, Err(nix::errno::Errno::EEXIST));
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &mp("a/z"),
        nix::fcntl::AT_FDCWD,
        &mp("a/y"),
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .unwrap();
    assert_eq!(fs::read(nas("a/y")).unwrap(), b"z");
    assert_eq!(fs::read(mp("a/z")).unwrap(), b"x");
    assert_eq!(fs::read(mp("a/y")).unwrap(), b"z");

    // chmod, chown, utimens
    fs::set_permissions(mp("a/y"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(nas("a/y")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(mp("a/y"), Some(1), Some(1)).unwrap();
    let md = fs::metadata(nas("a/y")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1, 1));
    let when = std::time::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    fs::File::options()
        .write(true)
        .open(mp("a/y"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    assert_eq!(fs::metadata(nas("a/y")).unwrap().modified().unwrap(), when);
    assert_eq!(fs::metadata(mp("a/y")).unwrap().modified().unwrap(), when);

    // xattrs, where the NAS directory supports them
    let name = c"user.arenafs.test";
    let nas_supports = xattr_set(&nas("loras/keep.safetensors"), c"user.probe", b"1");
    if nas_supports {
        assert!(xattr_set(&mp("loras/new.bin"), name, b"v1"));
        assert_eq!(
            xattr_get(&nas("loras/new.bin"), name).as_deref(),
            Some(&b"v1"[..])
        );
        assert_eq!(
            xattr_get(&mp("loras/new.bin"), name).as_deref(),
            Some(&b"v1"[..])
        );
    } else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the NAS directory (a temporary directory) has no user xattrs on this machine"
        );
        eprintln!("the NAS directory has no user xattrs here; xattr part skipped");
    }

    // unlink
    fs::remove_file(mp("a/hard")).unwrap();
    assert!(!nas("a/hard").exists());
    assert_eq!(fs::read(nas("loras/keep.safetensors")).unwrap().len(), 100);
}

fn xattr_set(p: &Path, name: &std::ffi::CStr, value: &[u8]) -> bool {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid strings and value.
    unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        ) == 0
    }
}

fn xattr_get(p: &Path, name: &std::ffi::CStr) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid strings and buffer.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

#[test]
fn changes_are_made_as_the_caller() {
    require_mount!();
    let d = Dirs::new();
    fs::create_dir(d.nas.join("open")).unwrap();
    fs::set_permissions(d.nas.join("open"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(d.nas.join("rootonly")).unwrap();
    fs::set_permissions(d.nas.join("rootonly"), fs::Permissions::from_mode(0o755)).unwrap();
    // A directory only group `daemon` (gid 1) may write: reachable through a supplementary group.
    fs::create_dir(d.nas.join("team")).unwrap();
    std::os::unix::fs::chown(d.nas.join("team"), Some(0), Some(1)).unwrap();
    fs::set_permissions(d.nas.join("team"), fs::Permissions::from_mode(0o770)).unwrap();
    for dir in [&d.tmp.path().to_path_buf(), &d.mnt] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let m = d.mount(&[]);
    let mp = |p: &str| m.path(p).display().to_string();

    let out = sh_as(
        65534,
        65534,
        "65534",
        &format!("umask 022; echo hi > {}", mp("open/mine")),
    );
    assert!(out.status.success(), "{out:?}");
    let md = fs::metadata(d.nas.join("open/mine")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (65534, 65534, 0o644)
    );
    let out = sh_as(
        65534,
        65534,
        "65534",
        &format!("umask 002; mkdir {}", mp("open/dir")),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::metadata(d.nas.join("open/dir")).unwrap().mode() & 0o777,
        0o775,
        "the caller's umask, applied once"
    );
    let out = sh_as(
        65534,
        65534,
        "65534",
        &format!("touch {}", mp("rootonly/no")),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert!(!d.nas.join("rootonly/no").exists());
    let out = sh_as(
        65534,
        65534,
        "65534,1",
        &format!("touch {}", mp("team/yes")),
    );
    assert!(out.status.success(), "supplementary group: {out:?}");
    assert_eq!(fs::metadata(d.nas.join("team/yes")).unwrap().uid(), 65534);
    // Someone else's file: no chmod.
    let out = sh_as(2, 2, "2", &format!("chmod 777 {}", mp("open/mine")));
    assert!(!out.status.success());
    drop(m);

    // A fixed identity.
    let m = d.mount(&["write_as=1000:1000"]);
    fs::write(m.path("open/fixed"), b"x").unwrap();
    let md = fs::metadata(d.nas.join("open/fixed")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000));
    assert_eq!(
        errno(fs::write(m.path("rootonly/fixed"), b"x")),
        libc::EACCES,
        "root's writes are made as 1000:1000 too"
    );
}

#[test]
fn writing_a_cached_file_never_mixes_copy_and_nas_bytes() {
    require_mount!();
    let d = Dirs::new();
    let size = 4 * CHUNK as usize;
    let old = d.nas_file("loras/m.safetensors", size, 1);
    let new = random_bytes(size, 2);

    // Readers served from the copy in user space: once a writer opens the file, their reads
    // come from the NAS.
    let m = d.mount(&["min_size_mb=0", "passthrough=0"]);
    let p = m.path("loras/m.safetensors");
    assert_eq!(fs::read(&p).unwrap(), old);
    m.wait_copies(1);
    let reader = fs::File::open(&p).unwrap();
    let mut head = vec![0u8; 4096];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, old[..4096]);
    assert_eq!(m.stats().opens_ssd, 1);
    let writer = fs::OpenOptions::new().write(true).open(&p).unwrap();
    assert_eq!(entries(&m), 0, "the copy goes when the writer opens");
    writer
        .write_all_at(&new[size / 2..], size as u64 / 2)
        .unwrap();
    let mut tail = vec![0u8; size / 2];
    reader.read_exact_at(&mut tail, size as u64 / 2).unwrap();
    assert_eq!(tail, new[size / 2..], "the NAS's bytes, not the old copy's");
    drop(writer);
    drop(reader);
    let mut expected = old[..size / 2].to_vec();
    expected.extend_from_slice(&new[size / 2..]);
    assert_eq!(fs::read(&p).unwrap(), expected);
    assert_eq!(
        fs::read(d.nas.join("loras/m.safetensors")).unwrap(),
        expected
    );
    drop(m);

    // A reader through passthrough keeps the old bytes whole; the writer waits for it.
    fs::write(d.nas.join("loras/m.safetensors"), &old).unwrap();
    let m = d.mount(&["min_size_mb=0"]);
    let p = m.path("loras/m.safetensors");
    assert_eq!(fs::read(&p).unwrap(), old);
    m.wait_copies(1);
    let mut reader = fs::File::open(&p).unwrap();
    assert!(m.stats().opens_passthrough >= 1);
    let writer = std::thread::spawn({
        let p = p.clone();
        let new = new.clone();
        move || fs::write(&p, &new).unwrap()
    });
    wait_for(
        "the writer waiting for the reader",
        Duration::from_secs(10),
        || {
            m.log()
                .contains("write open waits for readers of the cache copy to close")
        },
    );
    let mut seen = Vec::new();
    reader.read_to_end(&mut seen).unwrap();
    assert_eq!(seen, old, "no new bytes through the old copy");
    assert!(!writer.is_finished(), "the writer waits for the reader");
    drop(reader);
    writer.join().unwrap();
    assert_eq!(fs::read(&p).unwrap(), new);
    assert_eq!(fs::read(d.nas.join("loras/m.safetensors")).unwrap(), new);
}

#[test]
fn download_tools_and_renames() {
    require_mount!();
    let d = Dirs::new();
    let a = d.nas_file("loras/a.safetensors", 2 * CHUNK as usize, 1);
    let b = d.nas_file("loras/b.safetensors", 2 * CHUNK as usize, 2);
    d.nas_file("vae/sub/v.safetensors", CHUNK as usize, 3);
    let m = d.mount(&["min_size_mb=0"]);
    for f in [
        "loras/a.safetensors",
        "loras/b.safetensors",
        "vae/sub/v.safetensors",
    ] {
        fs::read(m.path(f)).unwrap();
    }
    m.wait_copies(3);

    // wget / huggingface-cli: write name.tmp, then rename over the final name.
    let data = random_bytes(3 * CHUNK as usize, 9);
    let tmp = m.path("loras/new.safetensors.tmp");
    let mut f = fs::File::create(&tmp).unwrap();
    for part in data.chunks(1 << 20) {
        f.write_all(part).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    fs::rename(&tmp, m.path("loras/new.safetensors")).unwrap();
    let before = m.stats().opens_filling;
    assert_eq!(fs::read(m.path("loras/new.safetensors")).unwrap(), data);
    assert_eq!(m.stats().opens_filling, before + 1, "cached on first read");
    m.wait_copies(4);

    // A rename over a cached file: neither name serves a copy made under the other.
    assert_eq!(
        cached(&m),
        [
            "loras/a.safetensors",
            "loras/b.safetensors",
            "loras/new.safetensors",
            "vae/sub/v.safetensors"
        ]
    );
    assert_ne!(a, b);
    fs::rename(m.path("loras/a.safetensors"), m.path("loras/b.safetensors")).unwrap();
    assert_eq!(
        cached(&m),
        ["loras/new.safetensors", "vae/sub/v.safetensors"],
        "both copies dropped"
    );
    assert_eq!(fs::read(m.path("loras/b.safetensors")).unwrap(), a);
    assert_eq!(errno(fs::read(m.path("loras/a.safetensors"))), libc::ENOENT);
    // A directory rename moves no copy either.
    fs::rename(m.path("vae/sub"), m.path("vae/other")).unwrap();
    assert!(!cached(&m).contains(&"vae/sub/v.safetensors".to_string()));
    assert_eq!(
        fs::read(m.path("vae/other/v.safetensors")).unwrap(),
        random_bytes(CHUNK as usize, 3)
    );

    // An open file whose name is removed keeps reading, and fstat works.
    let mut f = fs::File::open(m.path("loras/new.safetensors")).unwrap();
    fs::remove_file(m.path("loras/new.safetensors")).unwrap();
    assert!(!d.nas.join("loras/new.safetensors").exists());
    assert_eq!(f.metadata().unwrap().len(), data.len() as u64);
    f.seek(SeekFrom::Start(CHUNK)).unwrap();
    let mut buf = vec![0u8; 1000];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data[CHUNK as usize..CHUNK as usize + 1000]);
    // Made again under the same name: the new content, not a copy of the old.
    fs::write(m.path("loras/new.safetensors"), b"small now").unwrap();
    assert_eq!(
        fs::read(m.path("loras/new.safetensors")).unwrap(),
        b"small now"
    );
    wait_for(
        "the daemon's index to settle",
        Duration::from_secs(10),
        || m.status()["jobs"].as_array().unwrap().is_empty(),
    );
}

/// POSIX (pjdfstest `chmod/12.t`): a write by someone else than the owner succeeds and clears
/// the set-user-ID and set-group-ID bits of the file, as it would on the NAS directly.
#[test]
fn a_write_by_another_user_clears_set_id_bits() {
    require_mount!();
    for passthrough in ["1", "0"] {
        let d = Dirs::new();
        fs::create_dir(d.nas.join("loras")).unwrap();
        for dir in [&d.tmp.path().to_path_buf(), &d.mnt] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let m = d.mount(&[&format!("passthrough={passthrough}")]);
        for (i, mode) in [0o4777, 0o2777, 0o6777].into_iter().enumerate() {
            let p = m.path(&format!("loras/f{i}"));
            fs::write(&p, b"").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            // O_WRONLY without O_TRUNC, one byte at offset 0, then fstat on the same descriptor.
            let out = sh_as(
                65534,
                65534,
                "65534",
                &format!(
                    "printf x | dd of={} conv=notrunc status=none && stat -c %a {}",
                    p.display(),
                    p.display()
                ),
            );
            assert!(
                out.status.success(),
                "passthrough={passthrough}, mode {mode:o}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let nas_mode = fs::metadata(d.nas.join(format!("loras/f{i}")))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777;
            assert_eq!(
                nas_mode, 0o777,
                "passthrough={passthrough}: set-id bits of {mode:o} kept on the NAS"
            );
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
                0o777,
                "passthrough={passthrough}: the mount shows set-id bits the NAS cleared"
            );
            assert_eq!(fs::read(&p).unwrap(), b"x");
        }
    }
}

/// A running program's file is never truncated through the mount: an `O_RDONLY|O_TRUNC` open of
/// it fails with `ETXTBSY` and leaves it whole (the kernel checks such an open only after the
/// file system has opened, and so truncated, the file).
#[test]
fn a_running_program_is_not_truncated() {
    use std::os::unix::fs::OpenOptionsExt;
    require_mount!();
    let d = Dirs::new();
    fs::create_dir(d.nas.join("bin")).unwrap();
    let m = d.mount(&[]);
    let exe = m.path("bin/sleep");
    fs::copy("/usr/bin/sleep", &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let want = fs::read("/usr/bin/sleep").unwrap();
    let mut child = Command::new(&exe).arg("30").spawn().unwrap();
    // Running: the kernel has the program's text mapped.
    wait_for("the program running", Duration::from_secs(10), || {
        fs::read_to_string(format!("/proc/{}/maps", child.id()))
            .is_ok_and(|maps| maps.contains(&*exe.to_string_lossy()))
    });
    for (what, flags) in [
        ("O_WRONLY", libc::O_WRONLY),
        ("O_RDWR", libc::O_RDWR),
        ("O_RDONLY|O_TRUNC", libc::O_RDONLY | libc::O_TRUNC),
    ] {
        let r = fs::OpenOptions::new()
            .read(flags & libc::O_ACCMODE != libc::O_WRONLY)
            .write(flags & libc::O_ACCMODE != libc::O_RDONLY)
            .custom_flags(flags & libc::O_TRUNC)
            .open(&exe);
        assert_eq!(errno(r), libc::ETXTBSY, "{what}");
        let on_nas = fs::read(d.nas.join("bin/sleep")).unwrap();
        assert!(
            on_nas == want,
            "{what}: the running program's file changed on the NAS ({} bytes, was {})",
            on_nas.len(),
            want.len()
        );
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the program still runs"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
