//! [`Chain`]: a chain of members (a full one, then diffs) opened from its tip and checked
//! before anything is restored from it.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use dirtylog::bitmap::runs;
use dirtylog_migrate::digest::mem_hash;
use dirtylog_migrate::wire::StreamHeader;
use dirtylog_migrate::DeviceSection;

use crate::error::SnapshotError;
use crate::format::{
    decode_devices, decode_vcpus, hex, mem_file, parse_hex, present_file, read_small, Kind,
    Manifest, CHUNK_SIZE, DEVICES, FORMAT, MANIFEST, MAX_MANIFEST, VCPUS,
};

/// The longest chain accepted.
pub const MAX_CHAIN: usize = 65_536;

const RESTORE_EARLIER: &str = "the member is damaged: restore from an earlier member of the chain";

/// An opened, checked chain: base (full) ..= tip.
#[derive(Debug)]
pub struct Chain {
    members: Vec<PathBuf>,
    manifests: Vec<Manifest>,
    manifest_hashes: Vec<u64>,
    header: StreamHeader,
    /// Per member, per region: the memory file.
    files: Vec<Vec<File>>,
    /// Per region, per page: the index of the member holding the page as of the tip.
    owners: Vec<Vec<u32>>,
}

/// The parent directory `p` names, relative to member `member`.
pub(crate) fn resolve_parent(member: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    // Lexically, so that `DIR/3` + `../2` names `DIR/2` in messages.
    let mut out = member.to_path_buf();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

struct Loaded {
    manifest: Manifest,
    hash: u64,
    header: StreamHeader,
}

fn load(
    path: &Path,
    child: Option<(&Path, u64)>,
    check_data: bool,
) -> Result<Loaded, SnapshotError> {
    let err = |why: String| SnapshotError::member(path, why);
    if !path.is_dir() {
        return Err(err(match child {
            Some((c, _)) => format!(
                "missing: it is the parent of {}, so that snapshot and every later one cannot be \
                 restored; restore from an earlier member, or take a new full snapshot",
                c.display()
            ),
            None => "missing: no snapshot there".into(),
        }));
    }
    let mpath = path.join(MANIFEST);
    if !mpath.exists() {
        return Err(err(format!(
            "incomplete: no {MANIFEST} (not a snapshot, or one whose writing never finished); \
             restore from its parent"
        )));
    }
    let bytes = read_small(&mpath, MAX_MANIFEST).map_err(|e| err(format!("{MANIFEST}: {e}")))?;
    let hash = mem_hash(&bytes);
    if let Some((c, expected)) = child {
        if hash != expected {
            return Err(err(format!(
                "is not the snapshot {} was taken against: its manifest hash is {}, the child \
                 records {} (replaced by a member of another chain, or re-created?); restore \
                 from a member of the chain it belongs to",
                c.display(),
                hex(hash),
                hex(expected)
            )));
        }
    }
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        err(format!(
            "{MANIFEST} does not parse ({e}): {RESTORE_EARLIER}"
        ))
    })?;
    if manifest.format != FORMAT {
        return Err(err(format!(
            "format {}, this build reads format {FORMAT}",
            manifest.format
        )));
    }
    match (manifest.kind, &manifest.parent) {
        (Kind::Full, None) | (Kind::Diff, Some(_)) => {}
        (k, _) => {
            return Err(err(format!(
                "a {} member {} a parent: {RESTORE_EARLIER}",
                k.name(),
                if k == Kind::Full { "with" } else { "without" }
            )))
        }
    }
    let header = StreamHeader::new(manifest.page_size, manifest.vcpu_count, manifest.layout())
        .map_err(|e| err(format!("invalid memory layout ({e}): {RESTORE_EARLIER}")))?;
    // The files: every expected one listed, each of the listed length, its chunks summed.
    let mut expected: Vec<(String, Option<u64>)> = Vec::new();
    let page = u64::from(manifest.page_size);
    for (i, r) in manifest.regions.iter().enumerate() {
        expected.push((mem_file(i), Some(r.size)));
        if manifest.kind == Kind::Diff {
            expected.push((present_file(i), Some((r.size / page).div_ceil(64) * 8)));
        }
    }
    expected.push((VCPUS.into(), None));
    expected.push((DEVICES.into(), None));
    if manifest.files.len() != expected.len() {
        return Err(err(format!(
            "the manifest lists {} files, a {} member has {}: {RESTORE_EARLIER}",
            manifest.files.len(),
            manifest.kind.name(),
            expected.len()
        )));
    }
    for (name, len) in &expected {
        let entry = manifest.file(name).ok_or_else(|| {
            err(format!(
                "the manifest does not list {name}: {RESTORE_EARLIER}"
            ))
        })?;
        if len.is_some_and(|l| l != entry.len) {
            return Err(err(format!(
                "the manifest gives {name} {} bytes for a region that needs {}: {RESTORE_EARLIER}",
                entry.len,
                len.unwrap_or(0)
            )));
        }
        if entry.chunk_size != CHUNK_SIZE
            || entry.chunks.len() as u64 != entry.len.div_ceil(CHUNK_SIZE)
        {
            return Err(err(format!(
                "the manifest's checksums of {name} do not cover the file: {RESTORE_EARLIER}"
            )));
        }
        let fpath = path.join(name);
        let meta = std::fs::metadata(&fpath)
            .map_err(|e| err(format!("{name}: {e}: {RESTORE_EARLIER}")))?;
        if meta.len() != entry.len {
            return Err(err(format!(
                "{name} is {} bytes, the manifest says {} (truncated or overwritten): \
                 {RESTORE_EARLIER}",
                meta.len(),
                entry.len
            )));
        }
        // The small files (bitmaps, states) always; the memory files with `check_data`.
        if check_data || !name.ends_with(".raw") {
            let f = File::open(&fpath).map_err(|e| err(format!("{name}: {e}")))?;
            // Chunks wholly inside holes read as zeros: hashed without reading them.
            let extents = data_extents(&f, entry.len);
            let sums = crate::format::chunk_hashes(&f, &fpath, entry.len, |c| {
                let (s, e) = (c * CHUNK_SIZE, (c + 1) * CHUNK_SIZE);
                extents.iter().any(|&(a, b)| a < e && s < b)
            })?;
            for (c, (got, want)) in sums.iter().zip(&entry.chunks).enumerate() {
                if parse_hex(want) != Some(*got) {
                    let start = c as u64 * CHUNK_SIZE;
                    let end = (start + CHUNK_SIZE).min(entry.len);
                    return Err(err(format!(
                        "{name}: chunk {c} (bytes {start}..{end}) fails its checksum (bit rot or \
                         tampering): {RESTORE_EARLIER}"
                    )));
                }
            }
        }
    }
    Ok(Loaded {
        manifest,
        hash,
        header,
    })
}

impl Chain {
    /// Open the chain ending at `tip`: every member's manifest parsed, parent links and
    /// manifest hashes checked, every file's length checked, the chunk checksums of the
    /// small files (present bitmaps, states) checked, and with `check_data` those of the
    /// memory files too. Errors name the member and say what to do.
    ///
    /// `tip` may also be a chain directory: its highest-numbered member is then the tip.
    pub fn open(tip: &Path, check_data: bool) -> Result<Chain, SnapshotError> {
        let resolved;
        let tip = if !tip.join(MANIFEST).exists() && tip.is_dir() {
            match crate::create::member_numbers(tip)?.last() {
                Some(n) => {
                    resolved = tip.join(n.to_string());
                    resolved.as_path()
                }
                None => tip,
            }
        } else {
            tip
        };
        let mut rev: Vec<(PathBuf, Loaded)> = Vec::new();
        let mut seen = HashSet::new();
        let mut cur = tip.to_path_buf();
        let mut child: Option<(PathBuf, u64)> = None;
        loop {
            if rev.len() >= MAX_CHAIN {
                return Err(SnapshotError::member(
                    tip,
                    format!("the chain is longer than {MAX_CHAIN} members; merge it"),
                ));
            }
            let canon = cur.canonicalize().unwrap_or_else(|_| cur.clone());
            if !seen.insert(canon) {
                return Err(SnapshotError::member(
                    &cur,
                    "the chain loops back to this member: its parent links are corrupted",
                ));
            }
            let loaded = load(
                &cur,
                child.as_ref().map(|(p, h)| (p.as_path(), *h)),
                check_data,
            )?;
            if let Some((c, _)) = &child {
                let tip_header = &rev[0].1.header;
                if loaded.header != *tip_header {
                    return Err(SnapshotError::member(
                        &cur,
                        format!(
                            "its memory layout or vCPU count differs from {}'s: not its parent",
                            c.display()
                        ),
                    ));
                }
            }
            let next = match &loaded.manifest.parent {
                None => None,
                Some(p) => {
                    let h = parse_hex(&p.manifest_xxh3).ok_or_else(|| {
                        SnapshotError::member(
                            &cur,
                            format!(
                                "the parent's hash {:?} is not 16 hex digits",
                                p.manifest_xxh3
                            ),
                        )
                    })?;
                    Some((resolve_parent(&cur, &p.path), h))
                }
            };
            rev.push((cur.clone(), loaded));
            match next {
                None => break,
                Some((parent, h)) => {
                    child = Some((cur, h));
                    cur = parent;
                }
            }
        }
        rev.reverse();
        let header = rev[0].1.header.clone();
        let page = u64::from(header.page_size());
        let mut owners: Vec<Vec<u32>> = header
            .regions()
            .iter()
            .map(|r| vec![0u32; (r.size / page) as usize])
            .collect();
        let mut files = Vec::with_capacity(rev.len());
        for (m, (path, loaded)) in rev.iter().enumerate() {
            let mut per = Vec::new();
            for (i, r) in header.regions().iter().enumerate() {
                let fpath = path.join(mem_file(i));
                per.push(
                    File::open(&fpath).map_err(|e| {
                        SnapshotError::member(path, format!("{}: {e}", mem_file(i)))
                    })?,
                );
                let npages = r.size / page;
                let want = loaded.manifest.regions[i].pages_present;
                if loaded.manifest.kind == Kind::Full {
                    if want != npages {
                        return Err(SnapshotError::member(
                            path,
                            format!(
                                "a full member with {want} of region {i}'s {npages} pages: \
                                 {RESTORE_EARLIER}"
                            ),
                        ));
                    }
                    continue;
                }
                let bytes = read_small(&path.join(present_file(i)), npages.div_ceil(64) * 8)?;
                let words: Vec<u64> = bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect();
                let count: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
                let past_end = words.last().is_some_and(|&w| {
                    let used = npages % 64;
                    used != 0 && w >> used != 0
                });
                if count != want || past_end {
                    return Err(SnapshotError::member(
                        path,
                        format!(
                            "{}: {count} pages present, the manifest says {want}: {RESTORE_EARLIER}",
                            present_file(i)
                        ),
                    ));
                }
                for (first, n) in runs(&words) {
                    owners[i][first as usize..(first + n) as usize].fill(m as u32);
                }
            }
            files.push(per);
        }
        let (members, rest): (Vec<PathBuf>, Vec<Loaded>) = rev.into_iter().unzip();
        let (manifests, manifest_hashes) = rest.into_iter().map(|l| (l.manifest, l.hash)).unzip();
        Ok(Chain {
            members,
            manifests,
            manifest_hashes,
            header,
            files,
            owners,
        })
    }

    /// Check every chunk checksum of every member's files (what [`open`](Self::open) checks
    /// with `check_data`), on up to `threads` threads: the chunks that may hold data are
    /// split into contiguous shares, each read and hashed by one thread; chunks wholly in a
    /// hole are compared with the zero chunk's checksum without reading. The error is the
    /// one `open` would give for the member nearest the tip that fails.
    pub(crate) fn check_data(&self, threads: usize) -> Result<(), SnapshotError> {
        struct Job {
            member: usize,
            name: String,
            path: PathBuf,
            file: File,
            len: u64,
            want: Vec<Option<u64>>,
        }
        let mut jobs = Vec::new();
        // (job, chunk) pairs to read.
        let mut work: Vec<(usize, u64)> = Vec::new();
        let mut bad: Vec<BadChunk> = Vec::new();
        let mut full_zero: Option<u64> = None;
        for (m, (dir, manifest)) in self.members.iter().zip(&self.manifests).enumerate() {
            for entry in &manifest.files {
                let path = dir.join(&entry.name);
                let file = File::open(&path)
                    .map_err(|e| SnapshotError::member(dir, format!("{}: {e}", entry.name)))?;
                let extents = data_extents(&file, entry.len);
                let j = jobs.len();
                for c in 0..entry.len.div_ceil(CHUNK_SIZE) {
                    let (st, en) = (c * CHUNK_SIZE, ((c + 1) * CHUNK_SIZE).min(entry.len));
                    if extents.iter().any(|&(a, b)| a < en && st < b) {
                        work.push((j, c));
                    } else {
                        let size = en - st;
                        let zero = if size == CHUNK_SIZE {
                            *full_zero.get_or_insert_with(|| {
                                crate::format::zero_chunk_hash(CHUNK_SIZE as usize)
                            })
                        } else {
                            crate::format::zero_chunk_hash(size as usize)
                        };
                        if parse_hex(&entry.chunks[c as usize]) != Some(zero) {
                            bad.push((m, j, c));
                        }
                    }
                }
                jobs.push(Job {
                    member: m,
                    name: entry.name.clone(),
                    path,
                    file,
                    len: entry.len,
                    want: entry.chunks.iter().map(|h| parse_hex(h)).collect(),
                });
            }
        }
        let threads = threads.clamp(1, 16);
        let share = work.len().div_ceil(threads).max(1);
        let results: Vec<Result<Vec<BadChunk>, SnapshotError>> = std::thread::scope(|s| {
            let handles: Vec<_> = work
                .chunks(share)
                .map(|part| {
                    let jobs = &jobs;
                    s.spawn(move || {
                        let mut buf = vec![0u8; CHUNK_SIZE as usize];
                        let mut out = Vec::new();
                        for &(j, c) in part {
                            let job = &jobs[j];
                            let start = c * CHUNK_SIZE;
                            let size = (job.len - start).min(CHUNK_SIZE) as usize;
                            crate::format::read_full_at(
                                &job.file,
                                &job.path,
                                &mut buf[..size],
                                start,
                            )?;
                            if job.want[c as usize] != Some(mem_hash(&buf[..size])) {
                                out.push((job.member, j, c));
                            }
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SnapshotError::Usage("a checksum thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            bad.extend(r?);
        }
        // The member nearest the tip first (as `open` walks), then file and chunk order.
        let Some(&(m, j, c)) = bad
            .iter()
            .min_by_key(|&&(m, j, c)| (std::cmp::Reverse(m), j, c))
        else {
            return Ok(());
        };
        let job = &jobs[j];
        let start = c * CHUNK_SIZE;
        let end = (start + CHUNK_SIZE).min(job.len);
        Err(SnapshotError::member(
            &self.members[m],
            format!(
                "{}: chunk {c} (bytes {start}..{end}) fails its checksum (bit rot or \
                 tampering): {RESTORE_EARLIER}",
                job.name
            ),
        ))
    }

    /// The members' directories, base first.
    pub fn members(&self) -> &[PathBuf] {
        &self.members
    }

    /// The members' manifests, base first.
    pub fn manifests(&self) -> &[Manifest] {
        &self.manifests
    }

    /// The tip's manifest.
    pub fn tip_manifest(&self) -> &Manifest {
        &self.manifests[self.manifests.len() - 1]
    }

    /// The tip's directory.
    pub fn tip(&self) -> &Path {
        &self.members[self.members.len() - 1]
    }

    /// XXH3-64 of the tip's `manifest.json`: what a diff against it records as its parent.
    pub fn tip_manifest_hash(&self) -> u64 {
        self.manifest_hashes[self.manifest_hashes.len() - 1]
    }

    /// The guest's layout: page size, vCPUs, memory map.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Which member (index in [`members`](Self::members)) holds page `page` of region
    /// `region` as of the tip.
    pub fn owner(&self, region: usize, page: u64) -> Option<usize> {
        self.owners
            .get(region)?
            .get(usize::try_from(page).ok()?)
            .map(|&m| m as usize)
    }

    /// Read page `page` of region `region` as of the tip into `out` (page_size bytes).
    pub fn read_page(&self, region: usize, page: u64, out: &mut [u8]) -> Result<(), SnapshotError> {
        self.read_pages(region, page, out)
    }

    /// Read the pages `first..` of region `region` as of the tip into `out` (whole pages),
    /// one `pread` per run of pages held by the same member.
    pub fn read_pages(
        &self,
        region: usize,
        first: u64,
        out: &mut [u8],
    ) -> Result<(), SnapshotError> {
        let page = u64::from(self.header.page_size());
        let owners = self
            .owners
            .get(region)
            .ok_or_else(|| SnapshotError::Usage(format!("the snapshot has no region {region}")))?;
        let n = out.len() as u64 / page;
        if out.len() as u64 % page != 0
            || first
                .checked_add(n)
                .is_none_or(|end| end > owners.len() as u64)
        {
            return Err(SnapshotError::Usage(format!(
                "pages {first}+{} bytes are not whole pages of region {region}",
                out.len()
            )));
        }
        let mut k = 0u64;
        while k < n {
            let m = owners[(first + k) as usize];
            let mut e = k + 1;
            while e < n && owners[(first + e) as usize] == m {
                e += 1;
            }
            let path = self.members[m as usize].join(mem_file(region));
            self.files[m as usize][region]
                .read_exact_at(
                    &mut out[(k * page) as usize..(e * page) as usize],
                    (first + k) * page,
                )
                .map_err(|e| SnapshotError::io("read", &path, e))?;
            k = e;
        }
        Ok(())
    }

    /// Member `m`'s memory file of region `region`, open for reading.
    pub(crate) fn file(&self, m: usize, region: usize) -> &File {
        &self.files[m][region]
    }

    /// The runs of pages of region `region` that member `m` holds as of the tip and that may
    /// hold data (not holes in its file): `(first page, pages)`. Zero pages need no copy
    /// into zero-filled memory.
    pub(crate) fn data_runs(&self, m: usize, region: usize) -> Vec<(u64, u64)> {
        let page = u64::from(self.header.page_size());
        let owners = &self.owners[region];
        let mut out = Vec::new();
        for (start, end) in data_extents(&self.files[m][region], owners.len() as u64 * page) {
            let (p0, p1) = (start / page, end.div_ceil(page));
            let mut p = p0;
            while p < p1 {
                if owners[p as usize] as usize != m {
                    p += 1;
                    continue;
                }
                let s = p;
                while p < p1 && owners[p as usize] as usize == m {
                    p += 1;
                }
                out.push((s, p - s));
            }
        }
        out
    }

    /// The vCPU states at the tip.
    pub fn vcpu_states(&self) -> Result<Vec<Vec<u8>>, SnapshotError> {
        let bytes = read_small(&self.tip().join(VCPUS), MAX_MANIFEST)?;
        decode_vcpus(&bytes, self.header.vcpu_count()).map_err(|e| {
            SnapshotError::member(self.tip(), format!("{VCPUS}: {e}: {RESTORE_EARLIER}"))
        })
    }

    /// The device sections at the tip.
    pub fn device_sections(&self) -> Result<Vec<DeviceSection>, SnapshotError> {
        let bytes = read_small(&self.tip().join(DEVICES), MAX_MANIFEST)?;
        decode_devices(&bytes).map_err(|e| {
            SnapshotError::member(self.tip(), format!("{DEVICES}: {e}: {RESTORE_EARLIER}"))
        })
    }

    /// Each region's recorded digest at the tip (`mem_digest` of the guest memory), in
    /// header order.
    pub fn memory_digests(&self) -> Result<Vec<u64>, SnapshotError> {
        self.tip_manifest()
            .regions
            .iter()
            .map(|r| {
                parse_hex(&r.memory_xxh3).ok_or_else(|| {
                    SnapshotError::member(
                        self.tip(),
                        format!("memory-xxh3 {:?} is not 16 hex digits", r.memory_xxh3),
                    )
                })
            })
            .collect()
    }
}

/// A chunk that fails its checksum: (member, file job, chunk).
type BadChunk = (usize, usize, u64);

/// The byte ranges of `file` (of `len` bytes) that may hold data, from `SEEK_DATA` and
/// `SEEK_HOLE`; the whole file if the file system cannot say.
pub(crate) fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let Ok(off) = libc::off_t::try_from(pos) else {
            break;
        };
        // SAFETY: lseek on a file descriptor we own (borrowed from `file`, open for the call);
        // it only moves the descriptor's offset, which nothing else here uses (reads are pread).
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past pos
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, len)];
        }
        let (d, h) = (data as u64, (hole as u64).min(len));
        if d >= len {
            break;
        }
        out.push((d, h));
        if h <= pos {
            return vec![(0, len)];
        }
        pos = h;
    }
    out
}
