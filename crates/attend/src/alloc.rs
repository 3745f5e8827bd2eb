//! The allocator setting a training or inference loop on the CPU wants: keep freed memory in the process.
//!
//! Tensors of a few MB come and go on every forward and backward pass. With glibc's default thresholds each is
//! handed back to the kernel (`munmap`) when freed, and on the next pass every 4 KiB page of its replacement faults
//! in again. PyTorch avoids this with its caching allocator; [`keep_freed_memory`] does it for glibc's malloc,
//! which candle and attend allocate through. Measured effect: BENCHMARKS.md ("Allocator").

/// Raises glibc's mmap threshold to its maximum (32 MiB: smaller blocks come from the heap and are reused) and its
/// trim threshold to 256 MiB (freed heap memory stays mapped). Call it once, first thing in `main`, before other
/// threads start. The cost: the process keeps up to the trim threshold of freed memory resident. No-op off
/// glibc/Linux; returns whether the settings were applied.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator thresholds.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hands the memory freed so far back to the kernel (glibc's `malloc_trim(0)`), so that the resident set counts
/// only live allocations: what a memory measurement wants as its baseline after a warm-up. No-op off
/// glibc/Linux; returns whether memory was released.
pub fn release_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free pages of the heap to the kernel.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
