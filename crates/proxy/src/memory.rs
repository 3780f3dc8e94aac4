//! The proxy process's memory: allocator settings ([`tune_allocator`]) and releasing the code
//! pages start-up touched ([`release_startup_code`]). Both exist for the resident-memory
//! figures in docs/performance.md (a thousand keep-alive connections in a few tens of MiB).

/// mimalloc's `arena_eager_commit` option (index 4 in its `mi_option_t`, mimalloc 2.x and 3.x).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
/// mimalloc's `purge_delay` option (index 15 in its `mi_option_t`, mimalloc 2.x and 3.x).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    // From the mimalloc library that `libmimalloc-sys` links (the `portico` binary's global
    // allocator). Declared here because that crate only exposes it behind a feature that
    // pulls in another dependency.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Tunes mimalloc (the `portico` binary's allocator) for a long-running proxy's resident memory
/// (`bench/conn_memory.sh`, docs/performance.md):
/// - freed pages go back to the OS after 2 ms instead of its default 10 ms (scaled by 10 for
///   arenas): with a thousand keep-alive connections coming and going, delayed pages were most of
///   the resident memory after a burst. 0 (at once) kept the least (42.2 vs 42.9 MiB busy at
///   1,000 connections, 46.9 with 10 ms) but cost a third more CPU per request (30 vs 21 µs:
///   pages purged and faulted back in between requests);
/// - arenas are committed page by page, not eagerly, and the process opts out of transparent
///   huge pages: eagerly committed arenas were backed by 2 MiB huge pages, 9 MiB resident at
///   start for ~1 MiB in use, and every sparsely used 2 MiB region counted whole.
///
/// `MIMALLOC_PURGE_DELAY` / `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still win. The
/// binary calls this from a constructor, before the first allocation reserves an arena, so it
/// must not allocate; calling it again is harmless.
pub fn tune_allocator() {
    use libmimalloc_sys as _;
    #[cfg(target_os = "linux")]
    // SAFETY: a process attribute; no memory is touched.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    for (var, option, value) in [
        (c"MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, 2),
        (
            c"MIMALLOC_ARENA_EAGER_COMMIT",
            MI_OPTION_ARENA_EAGER_COMMIT,
            0,
        ),
    ] {
        // SAFETY: getenv with a NUL-terminated name; only the pointer's nullness is used (no
        // allocation, unlike std::env, which matters before the allocator is set up).
        let set = unsafe { !libc::getenv(var.as_ptr()).is_null() };
        if !set {
            // SAFETY: sets one integer option; mimalloc reads options atomically and allows
            // changing them while running.
            unsafe { mi_option_set(option, value) };
        }
    }
}

/// Unmaps the executable's code and read-only data pages after start-up so that only the pages
/// the request path runs come back (see docs/performance.md, "resident code").
///
/// `portico` is one binary for every subcommand (control plane, console, `up`, the proxy):
/// start-up (flag parsing, config loading and validation, TLS set-up, the Service Control
/// client) touches code spread over much of it, and the kernel maps up to 64 KiB around every
/// page fault, so ~10 MiB of the 26 MiB binary stayed resident in the proxy. Measured at 1,000
/// busy connections the file-backed resident pages went from 11.7 to 8.8 MiB.
///
/// Only mappings of the executable that are not writable and hold no anonymous (copied) pages
/// are released: their contents are the file's, so `MADV_DONTNEED` only drops page-table
/// entries and the next use maps the page again from the page cache (a minor fault, no I/O
/// while the file is cached). Linux only; on failure nothing changes.
pub fn release_startup_code() {
    #[cfg(target_os = "linux")]
    {
        let exe = match std::fs::read_link("/proc/self/exe") {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "cannot find the executable; code pages kept");
                return;
            }
        };
        let smaps = match std::fs::read_to_string("/proc/self/smaps") {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read /proc/self/smaps; code pages kept");
                return;
            }
        };
        let mut released = 0usize;
        for m in read_only_clean_mappings(&smaps, &exe.to_string_lossy()) {
            let (start, end) = m;
            let len = end - start;
            // SAFETY: the range is a whole mapping of our own executable that is read-only and
            // has no anonymous (copied-on-write) pages, so every page equals the file's and
            // MADV_DONTNEED only drops page-table entries that refault from the page cache.
            let ok =
                unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) == 0 };
            if ok {
                released += len;
            }
        }
        tracing::debug!(bytes = released, "start-up code pages released");
    }
}

/// `(start, end)` of each mapping of `exe` in `smaps` (the format of `/proc/PID/smaps`) that is
/// readable, not writable and has no anonymous pages. A path with spaces or a `(deleted)`
/// executable never matches, which only means nothing is released.
fn read_only_clean_mappings(smaps: &str, exe: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let perms = fields.next().unwrap_or("");
            let path = line.split_whitespace().nth(5).unwrap_or("");
            current = match (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                (Ok(s), Ok(e)) if path == exe && perms.starts_with('r') && !perms.contains('w') => {
                    Some((s, e))
                }
                _ => None,
            };
        } else if first == "Anonymous:" {
            if let Some(m) = current.take() {
                if fields.next() == Some("0") {
                    out.push(m);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a04c4000 r--p 00000000 fe:00 1234                       /opt/portico/bin/portico
Size:               4880 kB
Rss:                2304 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
55d0a04c4000-55d0a13f6000 r-xp 004c4000 fe:00 1234                       /opt/portico/bin/portico
Size:              15560 kB
Rss:                7452 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me dw sd
55d0a13f6000-55d0a1496000 r--p 013f6000 fe:00 1234                       /opt/portico/bin/portico
Size:                640 kB
Rss:                 640 kB
Anonymous:           640 kB
VmFlags: rd mr mw me dw ac sd
55d0a1496000-55d0a14a1000 rw-p 01495000 fe:00 1234                       /opt/portico/bin/portico
Size:                 44 kB
Anonymous:            44 kB
VmFlags: rd wr mr mw me dw ac sd
7f0000000000-7f0000100000 r-xp 00000000 fe:00 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               1024 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Size:               1024 kB
Anonymous:          1024 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_executable() {
        let got = read_only_clean_mappings(SMAPS, "/opt/portico/bin/portico");
        // Read-only data and code; not the relocated read-only part (it has copied pages),
        // not the writable data, not libc, not anonymous memory.
        assert_eq!(
            got,
            vec![
                (0x55d0a0000000, 0x55d0a04c4000),
                (0x55d0a04c4000, 0x55d0a13f6000)
            ]
        );
        assert!(read_only_clean_mappings(SMAPS, "/usr/bin/other").is_empty());
        assert!(read_only_clean_mappings("", "/opt/portico/bin/portico").is_empty());
    }

    fn exe_code_rss_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let exe = exe.to_string_lossy().to_string();
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut in_exe = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                in_exe = line.split_whitespace().nth(5) == Some(exe.as_str())
                    && line
                        .split_whitespace()
                        .nth(1)
                        .is_some_and(|p| p.contains('x'));
            } else if in_exe && first == "Rss:" {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        total
    }

    /// The released pages really leave the process (this test binary), and the code keeps
    /// running (it faults back in what it uses).
    #[cfg(target_os = "linux")]
    #[test]
    fn release_drops_resident_code_and_the_process_keeps_running() {
        let before = exe_code_rss_kib();
        release_startup_code();
        let after = exe_code_rss_kib();
        assert!(before > 0, "no resident code found for this test binary");
        assert!(
            after < before,
            "resident code of the test binary: {before} KiB before, {after} KiB after"
        );
        // Code that ran before runs again (faulted back from the page cache).
        assert_eq!(
            read_only_clean_mappings(SMAPS, "/opt/portico/bin/portico").len(),
            2
        );
    }
}
