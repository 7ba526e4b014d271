//! A GGUF parser for untrusted files: every count, length, offset and size read from the file is
//! checked against a named limit and against the bytes actually present before anything is
//! allocated for it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::metadata::{Metadata, Value};
use super::tensor_type::TensorType;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
/// Most tensors a file may declare (a Phi-3-medium has about 400).
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most key/value pairs a file may declare.
pub const MAX_KV: u64 = 1 << 16;
/// Longest string (key, tensor name, template, token) in bytes.
pub const MAX_STRING_BYTES: u64 = 16 << 20;
/// Most array items in all the metadata together (a 200k-token BPE vocabulary uses about 1M).
pub const MAX_METADATA_ITEMS: u64 = 1 << 23;
/// Arrays of arrays nest at most this deep.
pub const MAX_ARRAY_DEPTH: usize = 2;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_ALIGNMENT: u64 = 1 << 16;
/// Fewest bytes one key/value pair occupies: key length, empty key, type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes one tensor info occupies: name length, empty name, one dimension, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Where one tensor lies in the file and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<usize>,
    pub dtype: TensorType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub size_bytes: usize,
}

impl TensorInfo {
    /// Where the tensor's bytes lie in the file.
    pub fn data(&self) -> Range<usize> {
        self.offset..self.offset + self.size_bytes
    }
}

/// Everything before the tensor data, parsed and validated.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
}

/// A memory-mapped GGUF file: the header parsed, the tensor data left in place.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    header: GgufHeader,
    index: HashMap<String, usize>,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::FileNotFound(path.clone()),
            _ => io_err(e),
        })?;
        let meta = file.metadata().map_err(io_err)?;
        if meta.is_dir() {
            return Err(Error::invalid_gguf(format!(
                "{} is a directory, not a GGUF file",
                path.display()
            )));
        }
        if meta.len() < 24 {
            return Err(Error::invalid_gguf(format!(
                "{} is {} bytes long, too short for a GGUF header",
                path.display(),
                meta.len()
            )));
        }
        // SAFETY: the map is read-only and private to this object; a file truncated by another
        // process while mapped is outside what any reader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let header = parse(&mmap)?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path,
            mmap,
            header,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The tensor's bytes, in place in the map (bounds were checked when parsing).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        self.bytes(info.data())
    }

    /// The file's bytes in `range` (a tensor's [`data`](TensorInfo::data), kept apart from its
    /// info).
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.mmap[range]
    }

    /// Lets the whole pages within `range` leave this process's memory, once their bytes have
    /// been copied elsewhere (the pages stay in the page cache; reading them again would fault
    /// them back in). A hint: where the system refuses, the pages merely stay.
    pub fn release(&self, range: Range<usize>) {
        #[cfg(unix)]
        {
            let page = page_size();
            let start = range.start.next_multiple_of(page);
            let end = range.end.min(self.mmap.len()) / page * page;
            if start < end {
                // SAFETY: the map is read-only and file-backed, so dropping its pages loses
                // nothing: a later read faults in the file's bytes again.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }
}

#[cfg(unix)]
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

/// Parses a GGUF header from the whole file's bytes.
pub fn parse(bytes: &[u8]) -> Result<GgufHeader> {
    let mut r = Reader {
        bytes,
        pos: 0,
        items_left: MAX_METADATA_ITEMS,
    };
    let magic = r.take(4, "magic")?;
    if magic != MAGIC {
        return Err(Error::invalid_gguf(format!(
            "bad magic {magic:02x?}, expected \"GGUF\""
        )));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::invalid_gguf(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        )));
    }
    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("key/value count")?;
    if tensor_count > MAX_TENSORS {
        return Err(Error::invalid_gguf(format!(
            "tensor count {tensor_count} is over the limit of {MAX_TENSORS}"
        )));
    }
    if kv_count > MAX_KV {
        return Err(Error::invalid_gguf(format!(
            "key/value count {kv_count} is over the limit of {MAX_KV}"
        )));
    }
    // Counts the file cannot hold are refused before anything is allocated for them.
    r.check_room(kv_count, MIN_KV_BYTES, "key/value count")?;

    let mut entries = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("key #{i}"))?;
        let value_type = r
            .u32(&format!("type of '{key}'"))
            .map_err(|e| e.at_key(&key))?;
        let value = r
            .value(value_type, &key, &format!("value of '{key}'"), 0)
            .map_err(|e| e.at_key(&key))?;
        if entries.insert(key.clone(), value).is_some() {
            return Err(
                Error::invalid_gguf(format!("metadata key '{key}' appears twice")).at_key(&key),
            );
        }
    }
    let metadata = Metadata::new(entries);

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a >= 8 && *a <= MAX_ALIGNMENT)
            .ok_or_else(|| {
                // The value, not its Debug form: that of a hostile array is as large as the file.
                let shown = match v.as_i64() {
                    Some(n) => n.to_string(),
                    None => format!("(a {})", v.type_name()),
                };
                Error::invalid_gguf(format!(
                    "general.alignment {shown} is not a power of two between 8 and {MAX_ALIGNMENT}"
                ))
                .at_key("general.alignment")
            })?,
    };

    r.check_room(tensor_count, MIN_TENSOR_INFO_BYTES, "tensor count")?;
    let mut raw = Vec::with_capacity(tensor_count as usize);
    let mut names = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.string(&format!("name of tensor #{i}"))?;
        let info = tensor_info(&mut r, &name, &mut names).map_err(|e| e.at_tensor(&name))?;
        raw.push((name, info.0, info.1, info.2));
    }

    let data_start = align_up(r.pos as u64, alignment);
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, dims, type_id, offset) in raw {
        let info = locate(
            &name, &dims, type_id, offset, alignment, data_start, file_len,
        )
        .map_err(|e| e.at_tensor(&name))?;
        tensors.push(TensorInfo { name, ..info });
    }
    Ok(GgufHeader { metadata, tensors })
}

/// A tensor's dimensions, type id and offset, read after its `name`; a name seen before (in
/// `names`) is refused.
fn tensor_info(
    r: &mut Reader,
    name: &str,
    names: &mut HashMap<String, ()>,
) -> Result<(Vec<u64>, u32, u64)> {
    if names.insert(name.to_string(), ()).is_some() {
        return Err(Error::invalid_gguf(format!(
            "tensor '{name}' appears twice"
        )));
    }
    let n_dims = r.u32(&format!("dimension count of tensor '{name}'"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(Error::invalid_gguf(format!(
            "tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(r.u64(&format!("dimension {d} of tensor '{name}'"))?);
    }
    let type_id = r.u32(&format!("type of tensor '{name}'"))?;
    let offset = r.u64(&format!("offset of tensor '{name}'"))?;
    Ok((dims, type_id, offset))
}

/// Where a tensor's data lies, checked to be aligned and inside the file (its `name` left
/// empty, for the caller to move in).
fn locate(
    name: &str,
    dims: &[u64],
    type_id: u32,
    offset: u64,
    alignment: u64,
    data_start: u64,
    file_len: u64,
) -> Result<TensorInfo> {
    let dtype = TensorType::from_id(type_id).ok_or_else(|| {
        Error::unsupported(format!(
            "tensor '{name}' has quantization type {type_id}, which phi3 does not support"
        ))
    })?;
    let size = tensor_size(name, dims, dtype)?;
    if !offset.is_multiple_of(alignment) {
        return Err(Error::invalid_gguf(format!(
            "tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    let start = data_start.checked_add(offset);
    let end = start.and_then(|s| s.checked_add(size));
    match (start, end) {
        (Some(start), Some(end)) if end <= file_len => Ok(TensorInfo {
            name: String::new(),
            dims: dims.iter().map(|&d| d as usize).collect(),
            dtype,
            offset: start as usize,
            size_bytes: size as usize,
        }),
        _ => Err(Error::invalid_gguf(format!(
            "tensor '{name}' ({size} bytes at data offset {offset}) runs past the end of the \
             file ({file_len} bytes): the file is truncated or corrupt"
        ))),
    }
}

fn tensor_size(name: &str, dims: &[u64], dtype: TensorType) -> Result<u64> {
    let block = dtype.block_size() as u64;
    if dims.contains(&0) {
        return Err(Error::invalid_gguf(format!(
            "tensor '{name}' has a zero dimension {dims:?}"
        )));
    }
    if !dims[0].is_multiple_of(block) {
        return Err(Error::invalid_gguf(format!(
            "tensor '{name}' row length {} is not a multiple of its {dtype:?} block size {block}",
            dims[0]
        )));
    }
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|elements| (elements / block).checked_mul(dtype.type_size() as u64))
        .filter(|&size| usize::try_from(size).is_ok())
        .ok_or_else(|| {
            Error::invalid_gguf(format!(
                "tensor '{name}' dimensions {dims:?} overflow the addressable size"
            ))
        })
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Array items still allowed in the whole metadata.
    items_left: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Refuses a `count` of things, each at least `min_bytes` long, that the bytes left cannot hold.
    fn check_room(&self, count: u64, min_bytes: u64, what: &str) -> Result<()> {
        if count.saturating_mul(min_bytes) > self.remaining() as u64 {
            return Err(Error::invalid_gguf(format!(
                "{what} {count} needs at least {min_bytes} bytes each, more than the {} bytes \
                 left in the file: truncated or corrupt",
                self.remaining()
            )));
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::invalid_gguf(format!(
                "file ends inside {what} (at byte {}, {} bytes needed, {} left): truncated",
                self.pos,
                n,
                self.remaining()
            )));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > MAX_STRING_BYTES {
            return Err(Error::invalid_gguf(format!(
                "{what} is {len} bytes long, over the limit of {MAX_STRING_BYTES}"
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::invalid_gguf(format!("{what} is not valid UTF-8")))
    }

    /// `what` ("value of 'key'") is built once per key, not once per array item.
    fn value(&mut self, value_type: u32, key: &str, what: &str, depth: usize) -> Result<Value> {
        Ok(match value_type {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::invalid_gguf(format!(
                        "'{key}' holds {b}, which is not a bool"
                    )))
                }
            },
            8 => Value::String(self.string(what)?),
            9 => self.array_value(key, what, depth)?,
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(Error::invalid_gguf(format!(
                    "'{key}' has unknown value type {other}"
                )))
            }
        })
    }

    fn array_value(&mut self, key: &str, what: &str, depth: usize) -> Result<Value> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(Error::invalid_gguf(format!(
                "'{key}' nests arrays deeper than {MAX_ARRAY_DEPTH}"
            )));
        }
        let item_type = self.u32(&format!("array type of '{key}'"))?;
        let count = self.u64(&format!("array length of '{key}'"))?;
        // Every item occupies at least this many bytes of the file, so a count the file cannot
        // hold is refused before anything is allocated for it.
        let min_item_bytes: u64 = match item_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            other => {
                return Err(Error::invalid_gguf(format!(
                    "'{key}' is an array of unknown type {other}"
                )))
            }
        };
        if count.saturating_mul(min_item_bytes) > self.remaining() as u64 {
            return Err(Error::invalid_gguf(format!(
                "'{key}' claims {count} items, more than the {} bytes left in the file can \
                 hold: truncated or corrupt",
                self.remaining()
            )));
        }
        if count > self.items_left {
            return Err(Error::invalid_gguf(format!(
                "'{key}' has {count} items: the metadata would exceed the limit of \
                 {MAX_METADATA_ITEMS} array items"
            )));
        }
        self.items_left -= count;
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(self.value(item_type, key, what, depth + 1)?);
        }
        Ok(Value::Array(items))
    }
}
