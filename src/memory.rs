//! The memory account behind `--memory-limit`, and the order in which
//! connections are shed to stay under it.
//!
//! **The account** is the heap itself: [`Counting`] wraps the system
//! allocator and keeps one running total of the bytes it hands out, as
//! malloc really holds them (each request rounded up to malloc's chunk
//! size). Every buffer the server controls is a heap allocation: outboxes
//! and their frames, tungstenite's read buffers and half-received messages,
//! request heads, in-memory history, the room tables, the store's indexes,
//! per-connection state. So the total is kept up to date exactly where
//! bytes are allocated and freed, with no walk over connections, and a
//! frame shared by a thousand outboxes counts once, because it is one
//! allocation (the outboxes add only their 16-byte references). The binary
//! installs it (`src/main.rs`); a library user who wants the limit installs
//! it the same way, and [`Server::bind`](crate::Server::bind) refuses a
//! limit without it.
//!
//! Not counted, and covered by the allowance documented in
//! `docs/memory.md`: the program's own code and static data, thread
//! stacks, the C allocations of the embedded SQLite (its page cache is
//! bounded by the store), malloc's own bookkeeping beyond the chunk
//! rounding, and kernel socket buffers (not in the process's resident
//! memory; capped per socket by `server::KERNEL_SEND_BUFFER`).
//!
//! **The shedding order** is [`Heaviest`]: open connections grouped by the
//! power of two of their queued output, so that picking one of the
//! heaviest is O(1) and keeping the groups current costs O(1) per change,
//! and nothing when a connection's outbox stays within its power of two.
//! It is pure and tested here without sockets.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes the heap holds for the program right now (0 until [`Counting`] is
/// the global allocator).
static HELD: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting. Install it with
/// `#[global_allocator] static A: loopchat::memory::Counting = loopchat::memory::Counting;`.
pub struct Counting;

/// What glibc's malloc really takes for a request of `size` bytes: an
/// 8-byte header, rounded up to 16, at least 32 (its minimum chunk); from
/// 64 KiB up (the mmap threshold [`tune_for_limit`] sets) whole pages.
fn charged(size: usize) -> usize {
    if size >= 64 * 1024 {
        (size + 16 + 4095) & !4095
    } else {
        ((size + 8 + 15) & !15).max(32)
    }
}

// SAFETY: every call is passed straight to `System`, which upholds the
// GlobalAlloc contract; the counter is only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            HELD.fetch_add(charged(layout.size()), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            HELD.fetch_add(charged(layout.size()), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        HELD.fetch_sub(charged(layout.size()), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            HELD.fetch_sub(charged(layout.size()), Ordering::Relaxed);
            HELD.fetch_add(charged(new_size), Ordering::Relaxed);
        }
        p
    }
}

/// Bytes the heap holds right now.
pub fn held() -> usize {
    HELD.load(Ordering::Relaxed)
}

/// Whether [`Counting`] is the global allocator: an allocation moves the
/// account.
pub fn counting() -> bool {
    let before = held();
    let probe = std::hint::black_box(vec![0u8; 4096]);
    let moved = held() != before;
    drop(probe);
    moved
}

/// Tune malloc for a hard limit (called only when `--memory-limit` is
/// set): every allocation of 64 KiB or more gets its own mapping, returned
/// to the kernel when freed. By default glibc raises that threshold as the
/// program frees large blocks, and the old buffers an outbox's queue
/// leaves behind each time it doubles then stay in the heap as free,
/// resident holes: measured, 15 MB of them beside a 48 MB account.
pub fn tune_for_limit() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

/// Hand freed heap memory back to the kernel. glibc keeps freed chunks
/// for reuse, which is right while the server is busy, but after a shedding
/// episode it would leave the resident size at the episode's peak.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Read this process's resident size from `/proc/self/statm` (0 where it
/// cannot be read).
pub fn resident() -> usize {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    pages * page
}

/// How often, at most, the resident size is read again (a `/proc` read).
pub const SAMPLE_MS: u64 = 10;

/// How often, at most, malloc is asked to hand back free memory when no
/// shedding asked for it.
pub const TRIM_MS: u64 = 100;

/// The account `--memory-limit` is checked against: the heap the counting
/// allocator sees, exactly and at once, plus what malloc keeps resident
/// beyond it (freed chunks between live ones), sampled from the resident
/// size at most every [`SAMPLE_MS`]. Without the second part, a heap held
/// under 48 MB measured 15 MB of such holes on top.
#[derive(Debug)]
pub struct Account {
    pub limit: usize,
    /// Resident size when the server started: code, libraries, static
    /// data. The limit is for what comes on top.
    base: usize,
    /// Resident bytes beyond the heap and the base, at the last sample.
    slack: usize,
    next_sample_ms: u64,
    /// Memory was freed by shedding and not yet handed back to the kernel.
    untrimmed: bool,
    /// When malloc may next be asked to hand back free memory unprompted.
    next_trim_ms: u64,
}

impl Account {
    pub fn new(limit: usize) -> Self {
        Account {
            limit,
            base: resident().saturating_sub(held()),
            slack: 0,
            next_sample_ms: 0,
            untrimmed: false,
            next_trim_ms: 0,
        }
    }

    /// What counts against the limit.
    pub fn used(&self) -> usize {
        held() + self.slack
    }

    pub fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Over `tenths`/10 of the limit.
    pub fn above(&self, tenths: usize) -> bool {
        self.used() > self.limit / 10 * tenths
    }

    /// Over the limit by the heap alone (not by what malloc keeps
    /// resident beside it).
    pub fn heap_over(&self) -> bool {
        held() > self.limit
    }

    /// Shedding freed memory: hand it back before the next sample.
    pub fn freed(&mut self) {
        self.untrimmed = true;
    }

    /// A sample taken since the last shedding: the account is current.
    pub fn settled(&self) -> bool {
        !self.untrimmed
    }

    /// Read the resident size again, at most every [`SAMPLE_MS`] (`false`
    /// when it was too soon). Memory freed by shedding is handed back to
    /// the kernel first, so that a sample never counts as held what is
    /// only waiting in malloc's free lists.
    pub fn sample(&mut self, now_ms: u64) -> bool {
        if now_ms < self.next_sample_ms {
            return false;
        }
        self.next_sample_ms = now_ms + SAMPLE_MS;
        // Freed memory waits in malloc's free lists after shedding, and
        // also after an ordinary burst (readers catching up); hand it back
        // when it is a tenth of the limit or more, at most every
        // TRIM_MS, since a trim walks malloc's free lists.
        let idle_slack = self.slack > self.limit / 10 && now_ms >= self.next_trim_ms;
        if std::mem::take(&mut self.untrimmed) || idle_slack {
            self.next_trim_ms = now_ms + TRIM_MS;
            give_back();
        }
        self.slack = resident().saturating_sub(self.base + held());
        true
    }
}

/// Open connections grouped by the size class of their queued output (the
/// class of `n` bytes is the bit length of `n`; 0 bytes is not tracked).
#[derive(Debug, Default)]
pub struct Heaviest {
    /// `classes[c]`: the keys whose queued bytes have bit length `c`.
    classes: Vec<Vec<usize>>,
    /// `at[key]`: `(class, index in classes[class])`, class 0 = untracked.
    at: Vec<(u8, u32)>,
    /// The highest class that may be non-empty.
    top: usize,
}

impl Heaviest {
    pub fn new() -> Self {
        Heaviest {
            classes: vec![Vec::new(); usize::BITS as usize + 1],
            at: Vec::new(),
            top: 0,
        }
    }

    /// `key` now has `queued` bytes of output. O(1); nothing moves while
    /// the amount stays within its power of two.
    pub fn update(&mut self, key: usize, queued: usize) {
        let class = (usize::BITS - queued.leading_zeros()) as usize;
        if key >= self.at.len() {
            self.at.resize(key + 1, (0, 0));
        }
        let (old, _) = self.at[key];
        if old as usize == class {
            return;
        }
        if old != 0 {
            self.take_out(key);
        }
        if class != 0 {
            let list = &mut self.classes[class];
            self.at[key] = (class as u8, list.len() as u32);
            list.push(key);
            self.top = self.top.max(class);
        }
    }

    /// `key` is gone.
    pub fn remove(&mut self, key: usize) {
        if self.at.get(key).is_some_and(|&(class, _)| class != 0) {
            self.take_out(key);
        }
    }

    /// One of the connections with the most queued output: its amount is
    /// at least half the largest.
    pub fn heaviest(&mut self) -> Option<usize> {
        while self.top > 0 {
            if let Some(&key) = self.classes[self.top].last() {
                return Some(key);
            }
            self.top -= 1;
        }
        None
    }

    fn take_out(&mut self, key: usize) {
        let (class, index) = self.at[key];
        let list = &mut self.classes[class as usize];
        list.swap_remove(index as usize);
        if let Some(&moved) = list.get(index as usize) {
            self.at[moved].1 = index;
        }
        self.at[key] = (0, 0);
    }
}

/// Parse a byte count with an optional `K`, `M` or `G` suffix (powers of
/// 1024), as `--memory-limit` takes it.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&text[..i], 1 << 20),
        (i, 'G' | 'g') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heaviest_is_within_a_factor_two_of_the_largest() {
        let mut h = Heaviest::new();
        let mut sizes = std::collections::HashMap::new();
        let mut x: u64 = 7;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = ((x >> 33) % 50) as usize;
            let queued = if (x >> 20) % 5 == 0 {
                0
            } else {
                ((x >> 40) % 1_000_000) as usize
            };
            if (x >> 10) % 7 == 0 {
                h.remove(key);
                sizes.remove(&key);
            } else {
                h.update(key, queued);
                sizes.insert(key, queued);
            }
            let largest = sizes.values().copied().max().unwrap_or(0);
            match h.heaviest() {
                None => assert_eq!(largest, 0),
                Some(k) => {
                    let got = sizes[&k];
                    assert!(got > 0 && got * 2 > largest, "{got} vs {largest}");
                }
            }
        }
    }

    #[test]
    fn shedding_in_order_empties_the_groups() {
        let mut h = Heaviest::new();
        for (key, queued) in [(1, 10), (2, 5000), (3, 70_000), (4, 0)] {
            h.update(key, queued);
        }
        let mut order = Vec::new();
        while let Some(k) = h.heaviest() {
            order.push(k);
            h.remove(k);
        }
        assert_eq!(order, vec![3, 2, 1]);
    }

    #[test]
    fn byte_counts_with_suffixes() {
        assert_eq!(parse_bytes("48M"), Some(48 << 20));
        assert_eq!(parse_bytes("64k"), Some(64 << 10));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("1000"), Some(1000));
        for bad in ["", "M", "12X", "-5M", "1.5G", "99999999999999999999G"] {
            assert_eq!(parse_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn malloc_rounding() {
        assert_eq!(charged(1), 32);
        assert_eq!(charged(24), 32);
        assert_eq!(charged(25), 48);
        assert_eq!(charged(200_000), 200_704);
        assert_eq!(charged(70_000), 73_728);
    }
}
