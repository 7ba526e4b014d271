//! A test-only GGUF writer: [`Gguf`] builds a file's bytes in memory from metadata pairs
//! ([`V`], any value, including ones no valid file holds) and tensors, with every count, type
//! and offset open to being set to a lie, so that the tests can build each kind of hostile file
//! the reader must refuse, and valid ones derived from the fixtures.

use super::{TensorType, Value};

// GGUF value type ids.
pub(super) const T_U8: u32 = 0;
pub(super) const T_U32: u32 = 4;
pub(super) const T_STRING: u32 = 8;
pub(super) const T_ARRAY: u32 = 9;
pub(super) const T_U64: u32 = 10;

// The type ids the tests write most (a tensor's type id is a plain u32, free to lie).
pub(super) const F32: u32 = TensorType::F32.id();
pub(super) const F16: u32 = TensorType::F16.id();
pub(super) const Q4_0: u32 = TensorType::Q4_0.id();
pub(super) const Q8_0: u32 = TensorType::Q8_0.id();

/// One metadata value to write. `Bytes` is a string of arbitrary (possibly invalid UTF-8) bytes;
/// `Raw` writes any type id followed by any payload.
#[derive(Clone, Debug)]
pub(super) enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Bytes(Vec<u8>),
    /// Item type id, items.
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
    Raw(u32, Vec<u8>),
}

pub(super) fn s(text: &str) -> V {
    V::Str(text.to_string())
}

fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u64).to_le_bytes());
    out.extend(bytes);
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) | V::Bytes(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
            V::Raw(t, _) => *t,
        }
    }

    /// The payload, without the type id.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            V::U8(v) => out.push(*v),
            V::I8(v) => out.extend(v.to_le_bytes()),
            V::U16(v) => out.extend(v.to_le_bytes()),
            V::I16(v) => out.extend(v.to_le_bytes()),
            V::U32(v) => out.extend(v.to_le_bytes()),
            V::I32(v) => out.extend(v.to_le_bytes()),
            V::F32(v) => out.extend(v.to_le_bytes()),
            V::Bool(v) => out.push(*v as u8),
            V::Str(v) => put_str(out, v.as_bytes()),
            V::Bytes(v) => put_str(out, v),
            V::Arr(item_type, items) => {
                out.extend(item_type.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                // Items are payloads only (a nested array: its item type, count, items).
                for item in items {
                    item.encode(out);
                }
            }
            V::U64(v) => out.extend(v.to_le_bytes()),
            V::I64(v) => out.extend(v.to_le_bytes()),
            V::F64(v) => out.extend(v.to_le_bytes()),
            V::Raw(_, payload) => out.extend(payload),
        }
    }

    /// The parsed value back as a writable one (arrays take their first item's type).
    pub(super) fn from_value(value: &Value) -> V {
        match value {
            Value::U8(v) => V::U8(*v),
            Value::I8(v) => V::I8(*v),
            Value::U16(v) => V::U16(*v),
            Value::I16(v) => V::I16(*v),
            Value::U32(v) => V::U32(*v),
            Value::I32(v) => V::I32(*v),
            Value::U64(v) => V::U64(*v),
            Value::I64(v) => V::I64(*v),
            Value::F32(v) => V::F32(*v),
            Value::F64(v) => V::F64(*v),
            Value::Bool(v) => V::Bool(*v),
            Value::String(v) => V::Str(v.clone()),
            Value::Array(items) => {
                let items: Vec<V> = items.iter().map(V::from_value).collect();
                V::Arr(items.first().map_or(T_U8, V::type_id), items)
            }
        }
    }
}

#[derive(Clone, Debug)]
struct TensorSpec {
    name: Vec<u8>,
    dims: Vec<u64>,
    type_id: u32,
    /// Relative to the start of the data section.
    offset: u64,
}

/// A GGUF file under construction. Counts default to the real ones; tensor data is appended
/// at aligned offsets.
#[derive(Clone, Debug)]
pub(super) struct Gguf {
    pub(super) magic: [u8; 4],
    pub(super) version: u32,
    pub(super) tensor_count: Option<u64>,
    pub(super) kv_count: Option<u64>,
    kvs: Vec<(Vec<u8>, V)>,
    tensors: Vec<TensorSpec>,
    /// Padding of the data section and of each tensor's data (not written as metadata).
    pub(super) alignment: usize,
    data: Vec<u8>,
}

impl Gguf {
    pub(super) fn new() -> Self {
        Self {
            magic: *b"GGUF",
            version: 3,
            tensor_count: None,
            kv_count: None,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
            data: Vec::new(),
        }
    }

    /// Adds a pair, whether or not the key is there already.
    pub(super) fn push(mut self, key: impl AsRef<[u8]>, value: V) -> Self {
        self.kvs.push((key.as_ref().to_vec(), value));
        self
    }

    /// Sets `key` to `value`, in place if present.
    pub(super) fn set(mut self, key: &str, value: V) -> Self {
        match self.kvs.iter_mut().find(|(k, _)| k == key.as_bytes()) {
            Some(kv) => kv.1 = value,
            None => self.kvs.push((key.as_bytes().to_vec(), value)),
        }
        self
    }

    pub(super) fn without(mut self, key: &str) -> Self {
        self.kvs.retain(|(k, _)| k != key.as_bytes());
        self
    }

    /// A tensor info alone, at any offset, with no data.
    pub(super) fn tensor_info(
        mut self,
        name: impl AsRef<[u8]>,
        dims: &[u64],
        type_id: u32,
        offset: u64,
    ) -> Self {
        self.tensors.push(TensorSpec {
            name: name.as_ref().to_vec(),
            dims: dims.to_vec(),
            type_id,
            offset,
        });
        self
    }

    /// A tensor with its data, appended at the next aligned offset (replacing any tensor of
    /// the same name, in place; its old data stays as unused bytes).
    pub(super) fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: &[u8]) -> Self {
        let offset = self.data.len().next_multiple_of(self.alignment);
        self.data.resize(offset, 0);
        self.data.extend(data);
        let spec = TensorSpec {
            name: name.as_bytes().to_vec(),
            dims: dims.to_vec(),
            type_id,
            offset: offset as u64,
        };
        match self.tensors.iter_mut().find(|t| t.name == name.as_bytes()) {
            Some(t) => *t = spec,
            None => self.tensors.push(spec),
        }
        self
    }

    pub(super) fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, F32, &data)
    }

    pub(super) fn without_tensor(mut self, name: &str) -> Self {
        self.tensors.retain(|t| t.name != name.as_bytes());
        self
    }

    /// Everything up to the end of the tensor infos.
    pub(super) fn header(&self) -> Vec<u8> {
        self.header_and_fields().0
    }

    /// The header and where its numeric fields start: counts, string lengths, value types,
    /// scalar values, array types and lengths, dimension counts, dimensions, tensor types and
    /// offsets (what the fuzz loop overwrites with interesting numbers).
    pub(super) fn header_and_fields(&self) -> (Vec<u8>, Vec<usize>) {
        let mut fields = vec![8, 16];
        let mut out = Vec::new();
        out.extend(self.magic);
        out.extend(self.version.to_le_bytes());
        out.extend(
            self.tensor_count
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        out.extend(self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            fields.push(out.len());
            put_str(&mut out, key);
            fields.push(out.len());
            out.extend(value.type_id().to_le_bytes());
            fields.push(out.len());
            if let V::Arr(..) = value {
                fields.push(out.len() + 4);
            }
            value.encode(&mut out);
        }
        for t in &self.tensors {
            fields.push(out.len());
            put_str(&mut out, &t.name);
            fields.push(out.len());
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                fields.push(out.len());
                out.extend(d.to_le_bytes());
            }
            fields.push(out.len());
            out.extend(t.type_id.to_le_bytes());
            fields.push(out.len());
            out.extend(t.offset.to_le_bytes());
        }
        (out, fields)
    }

    pub(super) fn build(&self) -> Vec<u8> {
        let mut out = self.header();
        if !self.tensors.is_empty() || !self.data.is_empty() {
            out.resize(out.len().next_multiple_of(self.alignment), 0);
            out.extend(&self.data);
        }
        out
    }
}
