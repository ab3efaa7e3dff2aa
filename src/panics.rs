//! Panics: a panic is a bug, and outside the one guarded place it aborts the process (systemd
//! restarts the unit; SQLite holds everything committed) rather than leave a thread silently
//! dead. The guarded place is the parsing of one reader record ([`caught`]): there a panic is
//! caught, so the reads already parsed reach the store and the next record is read.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;

thread_local! {
    /// This thread is inside [`caught`].
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Abort on every panic not inside [`caught`] (after the usual message, which reaches the
/// journal through stderr). The release profile unwinds so that [`caught`] can work; this keeps
/// the "a panic stops the process" rule everywhere else.
pub fn abort_unless_caught() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        if !GUARDED.with(Cell::get) {
            std::process::abort();
        }
    }));
}

/// Run `f`; `None` if it panicked. Only for pure work on untrusted input, which leaves nothing
/// half-changed when it unwinds.
pub fn caught<T>(f: impl FnOnce() -> T) -> Option<T> {
    let was = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    result.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_is_caught_and_the_guard_is_lifted() {
        assert_eq!(caught(|| 7), Some(7));
        let none: Option<()> = caught(|| panic!("a parser bug"));
        assert_eq!(none, None);
        assert!(!GUARDED.with(Cell::get));
    }
}
