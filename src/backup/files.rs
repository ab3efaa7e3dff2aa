//! Files on the stick, opened as a foreign filesystem's: never through a symbolic link, only a
//! regular file on the stick itself, new ones created exclusively; and a session's file read for
//! where it stands (its last complete row).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Open a file on the stick: never through a symbolic link, only a regular file on the stick
/// (`dev`, the device of `backup.dir`) itself; a file that is not there yet is created exclusively.
pub(super) fn open_on_stick(path: &Path, dev: u64) -> std::io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // O_NONBLOCK: a FIFO planted under the name must not hold the thread up.
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let opened = OpenOptions::new().read(true).write(true).custom_flags(flags).open(path);
    let file = match opened {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            OpenOptions::new().read(true).write(true).create_new(true).custom_flags(flags).open(path)?
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(std::io::Error::other("it is a symbolic link"));
        }
        other => other?,
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    if meta.dev() != dev {
        return Err(std::io::Error::other("it is not on the stick"));
    }
    Ok(file)
}

/// Note a file left alone (once).
pub(super) fn left_alone(refused: &mut Vec<String>, why: String) {
    if !refused.contains(&why) {
        refused.push(why);
    }
}

/// A session's file as found: open for appending, the number in the first column of its last row
/// (0 when only the header, or new) and that row.
pub(super) struct Found {
    pub file: File,
    pub last: i64,
    pub last_line: String,
}

/// Open a session's file for appending, cutting off a torn last line.
pub(super) fn open_file(path: &Path, header: &str, dev: u64) -> std::io::Result<Found> {
    let mut file = open_on_stick(path, dev)?;
    let len = file.metadata()?.len();
    if len == 0 {
        file.write_all(format!("{header}\n").as_bytes())?;
        return Ok(Found { file, last: 0, last_line: String::new() });
    }
    // The tail holds the last complete line (rows are short).
    let tail_len = len.min(64 * 1024);
    file.seek(SeekFrom::Start(len - tail_len))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.read_to_end(&mut tail)?;
    let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if complete < tail.len() {
        // A line torn by a pull or a full stick: cut it off, it is written again whole.
        file.set_len(len - tail_len + complete as u64)?;
    }
    let lines = &tail[..complete];
    let last_line = lines[..lines.len().saturating_sub(1)]
        .rsplit(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).to_string())
        .unwrap_or_default();
    let last = last_line.split(',').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    if complete == 0 && tail_len == len {
        // Nothing whole at all (not even the header): start again.
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(format!("{header}\n").as_bytes())?;
        return Ok(Found { file, last: 0, last_line: String::new() });
    }
    file.seek(SeekFrom::End(0))?;
    Ok(Found { file, last, last_line })
}

/// The cells of a CSV line (quoted cells as the CSV writer made them).
pub(super) fn cells(line: &str) -> Vec<String> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(line.as_bytes());
    reader.records().next().and_then(Result::ok).map(|r| r.iter().map(str::to_string).collect()).unwrap_or_default()
}

/// `base`, then `base-2` … `base-9` (before `.csv`): where a session is written when a file of
/// its name is not its own.
pub(super) fn candidates(base: &str) -> impl Iterator<Item = String> + '_ {
    let stem = base.trim_end_matches(".csv");
    std::iter::once(base.to_string()).chain((2..=9).map(move |n| format!("{stem}-{n}.csv")))
}
