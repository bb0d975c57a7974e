//! POSIX tar archives, as WebDataset shards use them: a streaming writer of plain ustar
//! members (deterministic: mode 0644, owner 0, mtime 0) and a strict reader that walks member
//! headers by offset, so a shard can be indexed once and its members read on demand.
//!
//! The reader understands what common writers emit for regular files: ustar and GNU headers,
//! pax extended headers (`x`, for long or non-ASCII names) and GNU long names (`L`); it skips
//! directories, links and global pax headers. A header with a bad checksum, a member that runs
//! past the end of the file, or an archive without its end-of-archive block is an error that
//! names the file: such a shard is foreign or was cut short.

use std::fs::File;
use std::io::{BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Tar block size.
pub const BLOCK: u64 = 512;

fn bad(path: &Path, what: String) -> Error {
    Error::Config(format!("{}: {what}", path.display()))
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Pads `n` up to a whole number of blocks.
fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// A ustar header for a regular file `name` of `size` bytes.
fn header(name: &str, size: u64) -> std::result::Result<[u8; 512], String> {
    let mut h = [0u8; 512];
    let bytes = name.as_bytes();
    // Names up to 100 bytes fit the name field; longer ones split at a '/' into prefix/name.
    if bytes.len() <= 100 {
        h[..bytes.len()].copy_from_slice(bytes);
    } else {
        let split = bytes
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'/' && i <= 155 && bytes.len() - i - 1 <= 100)
            .map(|(i, _)| i)
            .next()
            .ok_or_else(|| format!("member name '{name}' is too long for a ustar header"))?;
        h[345..345 + split].copy_from_slice(&bytes[..split]);
        h[..bytes.len() - split - 1].copy_from_slice(&bytes[split + 1..]);
    }
    if size >= 1 << 33 {
        return Err(format!(
            "member '{name}' is {size} bytes, over ustar's 8 GiB"
        ));
    }
    let octal = |field: &mut [u8], v: u64| {
        let s = format!("{:0w$o}", v, w = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
    };
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// Writes a tar archive to `PATH.tmp` and renames it to `PATH` on [`TarWriter::finish`], so
/// the archive at `PATH` is always complete: a crash leaves at most the temporary file.
pub struct TarWriter {
    file: std::io::BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl TarWriter {
    /// Starts the archive that will appear at `path` (its folder is created).
    pub fn create(path: &Path) -> Result<TarWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let tmp = path.with_file_name(name);
        let file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        Ok(TarWriter {
            file: std::io::BufWriter::new(file),
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// Appends a regular file.
    pub fn append(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let h = header(name, data.len() as u64).map_err(|e| bad(&self.path, e))?;
        let pad = (padded(data.len() as u64) - data.len() as u64) as usize;
        (|| -> std::io::Result<()> {
            self.file.write_all(&h)?;
            self.file.write_all(data)?;
            self.file.write_all(&[0u8; 512][..pad])
        })()
        .map_err(|e| io(&self.tmp, e))
    }

    /// Writes the end-of-archive blocks, syncs and renames the archive into place.
    pub fn finish(self) -> Result<()> {
        let TarWriter { file, tmp, path } = self;
        (|| -> std::io::Result<()> {
            let mut file = file.into_inner().map_err(|e| e.into_error())?;
            file.write_all(&[0u8; 1024])?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })()
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(&path, e)
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// One regular file of an archive.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Its path inside the archive.
    pub name: String,
    /// Offset of its first header (a pax or long-name header where there is one).
    pub header: u64,
    /// Offset of its data.
    pub data: u64,
    /// Data size in bytes.
    pub size: u64,
}

impl Member {
    /// Offset of the next header.
    pub fn next(&self) -> u64 {
        self.data + padded(self.size)
    }
}

/// Parses a numeric header field: octal text, or GNU's base-256 for large values.
fn number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let t = text.trim();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The `path` record of a pax extended header, if any.
fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    let mut found = None;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(v) = rec.strip_prefix(b"path=") {
            found = Some(String::from_utf8_lossy(v).into_owned());
        }
        rest = &rest[len..];
    }
    found
}

/// A tar archive opened for reading by offset.
pub struct TarReader {
    file: BufReader<File>,
    path: PathBuf,
    len: u64,
}

impl TarReader {
    /// Opens `path`.
    pub fn open(path: &Path) -> Result<TarReader> {
        let file = File::open(path).map_err(|e| io(path, e))?;
        let len = file.metadata().map_err(|e| io(path, e))?.len();
        Ok(TarReader {
            file: BufReader::with_capacity(64 << 10, file),
            path: path.to_path_buf(),
            len,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pos = self.file.stream_position().map_err(|e| io(&self.path, e))?;
        if pos != offset {
            self.file
                .seek_relative(offset as i64 - pos as i64)
                .map_err(|e| io(&self.path, e))?;
        }
        self.file.read_exact(buf).map_err(|e| io(&self.path, e))
    }

    /// The regular file whose headers start at `offset`, or `None` at the end-of-archive block.
    /// Skips directories, links and global headers.
    pub fn member_at(&mut self, mut offset: u64) -> Result<Option<Member>> {
        let first = offset;
        let mut long_name: Option<String> = None;
        loop {
            if offset + BLOCK > self.len {
                return Err(bad(
                    &self.path,
                    format!(
                        "ends at byte {} without the end-of-archive block (truncated?)",
                        self.len
                    ),
                ));
            }
            let mut h = [0u8; 512];
            self.read_at(offset, &mut h)?;
            if h.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            let stored = number(&h[148..156]);
            let mut probe = h;
            probe[148..156].fill(b' ');
            let sum: u64 = probe.iter().map(|&b| b as u64).sum();
            if stored != Some(sum) {
                return Err(bad(
                    &self.path,
                    format!("byte {offset}: not a tar header (checksum mismatch; a foreign or damaged file?)"),
                ));
            }
            let size = number(&h[124..136])
                .ok_or_else(|| bad(&self.path, format!("byte {offset}: unreadable member size")))?;
            let data = offset + BLOCK;
            if data + size > self.len {
                return Err(bad(
                    &self.path,
                    format!(
                        "member at byte {offset} needs {size} bytes but the file ends first (truncated?)"
                    ),
                ));
            }
            match h[156] {
                b'x' | b'L' => {
                    if size > 1 << 20 {
                        return Err(bad(
                            &self.path,
                            format!("byte {offset}: extended header of {size} bytes"),
                        ));
                    }
                    let mut buf = vec![0u8; size as usize];
                    self.read_at(data, &mut buf)?;
                    long_name = if h[156] == b'L' {
                        Some(cstr(&buf))
                    } else {
                        pax_path(&buf).or(long_name)
                    };
                    offset = data + padded(size);
                }
                b'0' | 0 | b'7' => {
                    let name = long_name.take().unwrap_or_else(|| {
                        let prefix = if &h[257..262] == b"ustar" {
                            cstr(&h[345..500])
                        } else {
                            String::new()
                        };
                        let n = cstr(&h[..100]);
                        if prefix.is_empty() {
                            n
                        } else {
                            format!("{prefix}/{n}")
                        }
                    });
                    return Ok(Some(Member {
                        name,
                        header: first,
                        data,
                        size,
                    }));
                }
                _ => {
                    // Directories, links, global pax headers, ...: not files.
                    long_name = None;
                    offset = data + padded(size);
                }
            }
        }
    }

    /// Reads a member's data.
    pub fn read(&mut self, m: &Member) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; m.size as usize];
        self.read_at(m.data, &mut buf)?;
        Ok(buf)
    }

    /// Every regular file, in order, checking the archive through its end-of-archive block.
    pub fn members(&mut self) -> Result<Vec<Member>> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(m) = self.member_at(at)? {
            at = m.next();
            out.push(m);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = std::env::temp_dir().join(format!("tar-test-{}", std::process::id()));
        let path = dir.join("a.tar");
        let long = format!("{}/{}.txt", "d".repeat(120), "n".repeat(90));
        let files: Vec<(String, Vec<u8>)> = vec![
            ("x.0.png".into(), vec![1, 2, 3]),
            ("x.txt".into(), b"a caption".to_vec()),
            ("empty".into(), vec![]),
            (long, vec![7; 1000]),
        ];
        let mut w = TarWriter::create(&path).unwrap();
        for (n, d) in &files {
            w.append(n, d).unwrap();
        }
        w.finish().unwrap();
        assert!(!dir.join("a.tar.tmp").exists());
        let mut r = TarReader::open(&path).unwrap();
        let ms = r.members().unwrap();
        assert_eq!(ms.len(), files.len());
        for (m, (n, d)) in ms.iter().zip(&files) {
            assert_eq!(&m.name, n);
            assert_eq!(&r.read(m).unwrap(), d);
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64 % BLOCK, 0);
        // Cut short anywhere: an error, never a shorter list.
        for cut in [bytes.len() - 1024, bytes.len() - 600, 700, 100] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = TarReader::open(&path).unwrap().members().unwrap_err();
            assert!(e.to_string().contains("a.tar"), "{e}");
        }
        let mut flipped = bytes.clone();
        flipped[10] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = TarReader::open(&path).unwrap().members().unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pax_and_gnu_names() {
        let data = b"29 path=some/long/name.0.png\n";
        assert_eq!(pax_path(data).as_deref(), Some("some/long/name.0.png"));
        assert_eq!(number(b"0000012\0"), Some(10));
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
    }
}
