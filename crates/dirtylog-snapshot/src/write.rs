//! The crash-safe member writer.
//!
//! A member is written in `DIR/.N.tmp-<pid>`: the memory files (sparse, pages written with
//! `pwrite` at `page × page_size`, zero pages left as holes), then the present bitmaps and the
//! state files; every file is fsynced, the chunk checksums computed (from the bytes written
//! for a chunk whose last write covered it whole, else by reading it back), `manifest.json` written
//! and fsynced, the temporary directory fsynced, renamed to `DIR/N`, and `DIR` fsynced. Until
//! the rename, readers do not see the member (they ignore names starting with `.`); after it,
//! the member is complete on disk. Any failure removes the temporary directory.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dirtylog::DirtyBitmap;
use dirtylog_migrate::digest::{mem_hash, DigestTable};
use dirtylog_migrate::wire::Region;
use dirtylog_migrate::DeviceSection;

use crate::error::SnapshotError;
use crate::format::{
    chunk_hashes, encode_devices, encode_vcpus, hex, mem_file, present_file, FileEntry, Kind,
    Manifest, CHUNK_SIZE, DEVICES, MANIFEST, VCPUS,
};

/// The prefix of a temporary member's name: `.N.tmp-<pid>`.
pub(crate) fn tmp_name(index: u64) -> String {
    format!(".{index}.tmp-{}", std::process::id())
}

/// Is `name` a temporary member's (`.N.tmp-PID`)? Returns the pid.
pub(crate) fn tmp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (n, pid) = rest.split_once(".tmp-")?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Remove the temporary members in `dir` left by processes that no longer run. Best effort.
pub(crate) fn clean_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(tmp_pid) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// fsync a directory.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SnapshotError::io("fsync", dir, e))
}

/// Are all bytes zero?
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; `align_to` only reinterprets the aligned
        // middle of the slice.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && words
            .chunks(64)
            .all(|c| c.iter().fold(0, |a, w| a | w) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// A member being written, in its temporary directory. Page writes take `&self` and may come
/// from several threads (for distinct pages).
pub(crate) struct Member {
    /// The chain directory.
    pub(crate) chain_dir: PathBuf,
    /// The member's number.
    pub(crate) index: u64,
    /// The temporary directory.
    pub(crate) tmp: PathBuf,
    /// Full or diff.
    pub(crate) kind: Kind,
    page_size: u64,
    regions: Vec<Region>,
    files: Vec<(File, PathBuf)>,
    /// Pages this member carries.
    pub(crate) present: Vec<DirtyBitmap>,
    /// Pages whose bytes in the file are not a hole (so a zero page must be written over).
    data: Vec<DirtyBitmap>,
    /// Chunks of each memory file written to.
    touched: Vec<DirtyBitmap>,
    /// Chunks whose checksum is in `chunk_sums`: the last write to them covered them whole
    /// (its bytes are the chunk's contents), so the commit need not read them back.
    hashed: Vec<DirtyBitmap>,
    /// The checksums of the `hashed` chunks.
    chunk_sums: Vec<Vec<AtomicU64>>,
    /// The page hashes of the guest memory the chain holds, updated as pages are written.
    pub(crate) tables: Vec<DigestTable>,
    bytes: AtomicU64,
    vcpus: Option<Vec<Vec<u8>>>,
    devices: Vec<DeviceSection>,
}

impl Member {
    /// Create `chain_dir/.index.tmp-PID` with one sparse memory file per region.
    pub(crate) fn create(
        chain_dir: &Path,
        index: u64,
        kind: Kind,
        page_size: u32,
        regions: &[Region],
        tables: Vec<DigestTable>,
    ) -> Result<Member, (SnapshotError, Vec<DigestTable>)> {
        let tmp = chain_dir.join(tmp_name(index));
        if tmp.exists() {
            if let Err(e) = fs::remove_dir_all(&tmp) {
                return Err((SnapshotError::io("remove", &tmp, e), tables));
            }
        }
        if let Err(e) = fs::create_dir(&tmp) {
            return Err((SnapshotError::io("create", &tmp, e), tables));
        }
        let page = u64::from(page_size);
        let mut m = Member {
            chain_dir: chain_dir.to_path_buf(),
            index,
            tmp,
            kind,
            page_size: page,
            regions: regions.to_vec(),
            files: Vec::new(),
            present: regions
                .iter()
                .map(|r| DirtyBitmap::new(r.size / page))
                .collect(),
            data: regions
                .iter()
                .map(|r| DirtyBitmap::new(r.size / page))
                .collect(),
            touched: regions
                .iter()
                .map(|r| DirtyBitmap::new(r.size.div_ceil(CHUNK_SIZE)))
                .collect(),
            hashed: regions
                .iter()
                .map(|r| DirtyBitmap::new(r.size.div_ceil(CHUNK_SIZE)))
                .collect(),
            chunk_sums: regions
                .iter()
                .map(|r| {
                    (0..r.size.div_ceil(CHUNK_SIZE))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
            tables,
            bytes: AtomicU64::new(0),
            vcpus: None,
            devices: Vec::new(),
        };
        for (i, r) in regions.iter().enumerate() {
            let path = m.tmp.join(mem_file(i));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|f| f.set_len(r.size).map(|()| f));
            match f {
                Ok(f) => m.files.push((f, path)),
                Err(e) => {
                    let e = SnapshotError::io("create", &path, e);
                    let (tables, _) = m.discard();
                    return Err((e, tables));
                }
            }
        }
        Ok(m)
    }

    /// Bytes written to the memory files so far.
    pub(crate) fn bytes_written(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Pages carried so far.
    pub(crate) fn pages(&self) -> u64 {
        self.present.iter().map(DirtyBitmap::count).sum()
    }

    /// Write page `page` of region `region` (background mode's copy-before-write).
    #[allow(dead_code)]
    pub(crate) fn write_page(
        &self,
        region: usize,
        page: u64,
        bytes: &[u8],
    ) -> Result<(), SnapshotError> {
        self.write_run(region, page, bytes)
    }

    /// Write the pages `first..` of region `region` (`bytes`: whole pages). Runs of non-zero
    /// pages go out in one `pwrite` each; a zero page stays a hole unless this member had
    /// written data there before (then zeros are written over it).
    pub(crate) fn write_run(
        &self,
        region: usize,
        first: u64,
        bytes: &[u8],
    ) -> Result<(), SnapshotError> {
        let page = self.page_size as usize;
        let (file, path) = self
            .files
            .get(region)
            .ok_or_else(|| SnapshotError::Usage(format!("no region {region}")))?;
        let npages = (bytes.len() / page) as u64;
        if bytes.len() % page != 0
            || first
                .checked_add(npages)
                .is_none_or(|end| end > self.present[region].npages())
        {
            return Err(SnapshotError::Usage(format!(
                "pages {first}+{} bytes are not whole pages inside region {region}",
                bytes.len()
            )));
        }
        let table = &self.tables[region];
        let data = &self.data[region];
        // The pending run of pages to write: (first page, first byte index).
        let mut run: Option<(u64, usize)> = None;
        let flush = |run: &mut Option<(u64, usize)>, end: usize| -> Result<(), SnapshotError> {
            if let Some((p, start)) = run.take() {
                let buf = &bytes[start..end];
                file.write_all_at(buf, p * self.page_size)
                    .map_err(|e| SnapshotError::io("write", path, e))?;
                self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                let c0 = p * self.page_size / CHUNK_SIZE;
                let c1 = (p * self.page_size + buf.len() as u64 - 1) / CHUNK_SIZE;
                self.touched[region].set_range(c0, c1 - c0 + 1);
            }
            Ok(())
        };
        for (k, bytes_k) in bytes.chunks_exact(page).enumerate() {
            let p = first + k as u64;
            let zero = is_zero(bytes_k);
            if zero {
                table.record_zero(p, 1);
            } else {
                table.record_hashes(p, &[mem_hash(bytes_k)]);
            }
            // A zero page over a hole needs no write.
            let needs_write = !zero || data.test(p);
            if needs_write {
                if run.is_none() {
                    run = Some((p, k * page));
                }
                if zero {
                    data.clear_word_bits((p / 64) as usize, 1 << (p % 64));
                } else {
                    data.set(p);
                }
            } else {
                flush(&mut run, k * page)?;
            }
        }
        flush(&mut run, bytes.len())?;
        self.present[region].set_range(first, npages);
        self.hash_chunks(region, first * self.page_size, bytes);
        Ok(())
    }

    /// After a write of `bytes` at byte `start` of region `region`'s file (whose contents
    /// there are now exactly `bytes`: zero pages are holes or zeros): checksum the chunks it
    /// covers whole, so that the commit need not read them back, and forget the checksum of
    /// a chunk it covers in part. A chunk is written by one thread at a time (writers write
    /// distinct pages, and a whole-chunk write holds all of the chunk's pages).
    fn hash_chunks(&self, region: usize, start: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let len = self.regions[region].size;
        let end = start + bytes.len() as u64;
        let hashed = &self.hashed[region];
        for c in start / CHUNK_SIZE..=(end - 1) / CHUNK_SIZE {
            let (cs, ce) = (c * CHUNK_SIZE, ((c + 1) * CHUNK_SIZE).min(len));
            if cs >= start && ce <= end {
                let sum = mem_hash(&bytes[(cs - start) as usize..(ce - start) as usize]);
                self.chunk_sums[region][c as usize].store(sum, Ordering::Relaxed);
                hashed.set(c);
            } else {
                hashed.clear_word_bits((c / 64) as usize, 1 << (c % 64));
            }
        }
    }

    /// Record the saved vCPU states.
    pub(crate) fn set_vcpus(&mut self, blobs: Vec<Vec<u8>>) {
        self.vcpus = Some(blobs);
    }

    /// Record the saved device sections.
    pub(crate) fn set_devices(&mut self, sections: Vec<DeviceSection>) {
        self.devices = sections;
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<File, SnapshotError> {
        let path = self.tmp.join(name);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| SnapshotError::io("create", &path, e))?;
        f.write_all(bytes)
            .map_err(|e| SnapshotError::io("write", &path, e))?;
        Ok(f)
    }

    /// Write the remaining files, sync everything, write the manifest (whose `files` this
    /// fills in, and whose `pages-present` per region it sets), rename the member into
    /// place and sync the chain directory. Returns the member's path and the manifest's bytes.
    pub(crate) fn commit(
        &self,
        manifest: &mut Manifest,
    ) -> Result<(PathBuf, Vec<u8>), SnapshotError> {
        let vcpus = self
            .vcpus
            .as_ref()
            .ok_or_else(|| SnapshotError::Usage("no vCPU state was saved".into()))?;
        let mut extra: Vec<(String, File)> = Vec::new();
        if self.kind == Kind::Diff {
            for (i, p) in self.present.iter().enumerate() {
                let mut words = vec![0u64; p.words()];
                p.snapshot_into(&mut words);
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                extra.push((present_file(i), self.write_file(&present_file(i), &bytes)?));
            }
        }
        extra.push((VCPUS.into(), self.write_file(VCPUS, &encode_vcpus(vcpus))?));
        extra.push((
            DEVICES.into(),
            self.write_file(DEVICES, &encode_devices(&self.devices))?,
        ));
        let mut files = Vec::new();
        for (i, (f, path)) in self.files.iter().enumerate() {
            f.sync_all()
                .map_err(|e| SnapshotError::io("fsync", path, e))?;
            let len = self.regions[i].size;
            let (touched, hashed) = (&self.touched[i], &self.hashed[i]);
            // Chunks hashed as written need no read; the others written to are read back.
            let mut sums = chunk_hashes(f, path, len, |c| touched.test(c) && !hashed.test(c))?;
            for (c, sum) in sums.iter_mut().enumerate() {
                if hashed.test(c as u64) {
                    *sum = self.chunk_sums[i][c].load(Ordering::Relaxed);
                }
            }
            files.push(FileEntry {
                name: mem_file(i),
                len,
                chunk_size: CHUNK_SIZE,
                chunks: sums.into_iter().map(hex).collect(),
            });
        }
        for (name, f) in &extra {
            let path = self.tmp.join(name);
            f.sync_all()
                .map_err(|e| SnapshotError::io("fsync", &path, e))?;
            let len = f
                .metadata()
                .map_err(|e| SnapshotError::io("stat", &path, e))?
                .len();
            let sums = chunk_hashes(f, &path, len, |_| true)?;
            files.push(FileEntry {
                name: name.clone(),
                len,
                chunk_size: CHUNK_SIZE,
                chunks: sums.into_iter().map(hex).collect(),
            });
        }
        manifest.files = files;
        for (entry, p) in manifest.regions.iter_mut().zip(&self.present) {
            entry.pages_present = p.count();
        }
        let mut json = serde_json::to_vec_pretty(manifest)
            .map_err(|e| SnapshotError::Usage(format!("manifest: {e}")))?;
        json.push(b'\n');
        let mf = self.write_file(MANIFEST, &json)?;
        let mpath = self.tmp.join(MANIFEST);
        mf.sync_all()
            .map_err(|e| SnapshotError::io("fsync", &mpath, e))?;
        sync_dir(&self.tmp)?;
        let dest = self.chain_dir.join(self.index.to_string());
        if dest.exists() {
            return Err(SnapshotError::Usage(format!(
                "{} appeared while the snapshot was written: another writer on this chain?",
                dest.display()
            )));
        }
        fs::rename(&self.tmp, &dest).map_err(|e| SnapshotError::io("rename", &self.tmp, e))?;
        if let Err(e) = sync_dir(&self.chain_dir) {
            // Not known to be durable: take it back, so that the member is absent (and its
            // pages go to the next one) rather than present only until a power cut.
            let _ = fs::rename(&dest, &self.tmp);
            return Err(e);
        }
        Ok((dest, json))
    }

    /// Remove the temporary directory (best effort) and give back the tables.
    pub(crate) fn discard(self) -> (Vec<DigestTable>, Vec<DirtyBitmap>) {
        let _ = fs::remove_dir_all(&self.tmp);
        (self.tables, self.present)
    }

    /// The tables, after a commit.
    pub(crate) fn into_tables(self) -> Vec<DigestTable> {
        self.tables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names() {
        assert_eq!(tmp_pid(".3.tmp-1234"), Some(1234));
        assert_eq!(tmp_pid("3"), None);
        assert_eq!(tmp_pid(".x.tmp-1"), None);
        assert_eq!(tmp_pid(&tmp_name(7)), Some(std::process::id()));
        assert!(is_zero(&[0u8; 4099]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
    }

    /// The manifest of a full member of one region of `size` bytes written by `m`.
    fn full_manifest(m: &Member, size: u64) -> Manifest {
        Manifest {
            format: crate::format::FORMAT,
            kind: Kind::Full,
            parent: None,
            page_size: 4096,
            vcpu_count: 1,
            regions: vec![crate::format::RegionEntry {
                slot: 0,
                guest_phys_addr: 0,
                size,
                pages_present: 0,
                memory_xxh3: hex(m.tables[0].digest()),
            }],
            tracker: "dirty-log".into(),
            mode: crate::format::SnapshotMode::Stop,
            created: 0,
            files: Vec::new(),
            stats: Default::default(),
        }
    }

    #[test]
    fn chunks_hashed_as_written_match_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        // 3.5 MiB: chunks 0..3, the last one short.
        let size = (7 << 20) / 2;
        let regions = [Region {
            slot: 0,
            gpa: 0,
            size,
        }];
        let npages = size / 4096;
        let tables = vec![DigestTable::new(npages as usize, 4096)];
        let Ok(mut m) = Member::create(tmp.path(), 0, Kind::Full, 4096, &regions, tables) else {
            panic!("create failed");
        };
        let mut all: Vec<u8> = (0..size as usize).map(|i| (i % 251) as u8).collect();
        // Zero pages inside whole chunks: holes, hashed as zeros.
        all[4096..3 * 4096].fill(0);
        m.write_run(0, 0, &all).unwrap();
        assert!(
            (0..4).all(|c| m.hashed[0].test(c)),
            "every chunk written whole"
        );
        // A later write of part of chunk 1 (its first page becomes zero: zeros over data) and
        // of part of chunk 3: their sums must come from the file.
        m.write_run(0, 256, &[0u8; 4096]).unwrap();
        m.write_run(0, 3 * 256 + 5, &[7u8; 2 * 4096]).unwrap();
        assert!(m.hashed[0].test(0) && m.hashed[0].test(2));
        assert!(!m.hashed[0].test(1) && !m.hashed[0].test(3));
        // A whole rewrite of chunk 3 makes it hashed again.
        let tail = vec![9u8; (size - 3 * CHUNK_SIZE) as usize];
        m.write_run(0, 3 * 256, &tail).unwrap();
        assert!(m.hashed[0].test(3));
        m.set_vcpus(vec![vec![1]]);
        let mut manifest = full_manifest(&m, size);
        let (path, _) = m.commit(&mut manifest).unwrap();
        // The sums recorded are those of the file's bytes, chunk by chunk.
        let file = path.join(mem_file(0));
        let bytes = std::fs::read(&file).unwrap();
        let want: Vec<String> = bytes
            .chunks(CHUNK_SIZE as usize)
            .map(|c| hex(mem_hash(c)))
            .collect();
        assert_eq!(manifest.file(&mem_file(0)).unwrap().chunks, want);
        assert_eq!(&bytes[256 * 4096..257 * 4096], &[0u8; 4096][..]);
        crate::Chain::open(&path, true).unwrap();
    }

    #[test]
    fn zero_pages_are_holes_and_overwrites_stay_exact() {
        use std::os::unix::fs::MetadataExt;

        let tmp = tempfile::tempdir().unwrap();
        let regions = [Region {
            slot: 0,
            gpa: 0,
            size: 4 << 20,
        }];
        let tables = vec![DigestTable::new(1024, 4096)];
        let Ok(mut m) = Member::create(tmp.path(), 0, Kind::Full, 4096, &regions, tables) else {
            panic!("create failed");
        };
        assert!(tmp.path().join(tmp_name(0)).is_dir());
        // Pages 10..14: data, zero, data, zero.
        let mut run = vec![0u8; 4 * 4096];
        run[5] = 1;
        run[2 * 4096 + 7] = 2;
        m.write_run(0, 10, &run).unwrap();
        assert_eq!(m.bytes_written(), 2 * 4096);
        assert_eq!(m.pages(), 4);
        // Page 10 becomes zero in a later round: zeros are written over its data.
        m.write_page(0, 10, &[0u8; 4096]).unwrap();
        assert_eq!(m.bytes_written(), 3 * 4096);
        assert!(
            m.write_page(0, 1024, &[0u8; 4096]).is_err(),
            "past the region"
        );
        assert!(m.write_run(0, 0, &[0u8; 100]).is_err(), "not whole pages");
        // The rest of the (full) member: zero pages, which cost no write.
        m.write_run(0, 0, &vec![0u8; 10 * 4096]).unwrap();
        m.write_run(0, 14, &vec![0u8; 1010 * 4096]).unwrap();
        assert_eq!((m.pages(), m.bytes_written()), (1024, 3 * 4096));
        m.set_vcpus(vec![vec![1, 2]]);
        let mut manifest = full_manifest(&m, 4 << 20);
        let (path, _) = m.commit(&mut manifest).unwrap();
        assert_eq!(path, tmp.path().join("0"));
        assert!(!tmp.path().join(tmp_name(0)).exists());
        let file = path.join(mem_file(0));
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(bytes.len(), 4 << 20);
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(bytes[12 * 4096 + 7], 2);
        // Sparse: a few pages on disk, not 4 MiB.
        assert!(std::fs::metadata(&file).unwrap().blocks() * 512 <= 64 << 10);
        let chain = crate::Chain::open(&path, true).unwrap();
        let mut page = vec![9u8; 4096];
        chain.read_page(0, 12, &mut page).unwrap();
        assert_eq!(page[7], 2);
        chain.read_page(0, 500, &mut page).unwrap();
        assert!(is_zero(&page));
        assert_eq!(manifest.regions[0].pages_present, 1024);
    }
}
