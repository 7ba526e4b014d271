//! The element types a GGUF tensor may declare: ggml's type ids, and the size of each type's
//! blocks, which is all the reader needs to check where a tensor's bytes end.

use std::fmt;

/// A ggml tensor type that phi3 can load (computed by its own kernels or by candle's).
///
/// The variants are named as candle names them, so messages read the same on either path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl TensorType {
    pub const ALL: [TensorType; 15] = [
        TensorType::F32,
        TensorType::F16,
        TensorType::BF16,
        TensorType::Q4_0,
        TensorType::Q4_1,
        TensorType::Q5_0,
        TensorType::Q5_1,
        TensorType::Q8_0,
        TensorType::Q8_1,
        TensorType::Q2K,
        TensorType::Q3K,
        TensorType::Q4K,
        TensorType::Q5K,
        TensorType::Q6K,
        TensorType::Q8K,
    ];

    /// The type with ggml id `id`; `None` for the ids phi3 cannot load (removed types, the
    /// i-quants, integer tensors).
    pub fn from_id(id: u32) -> Option<TensorType> {
        TensorType::ALL.into_iter().find(|t| t.id() == id)
    }

    /// ggml's id for the type (`enum ggml_type`).
    pub const fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q4_1 => 3,
            TensorType::Q5_0 => 6,
            TensorType::Q5_1 => 7,
            TensorType::Q8_0 => 8,
            TensorType::Q8_1 => 9,
            TensorType::Q2K => 10,
            TensorType::Q3K => 11,
            TensorType::Q4K => 12,
            TensorType::Q5K => 13,
            TensorType::Q6K => 14,
            TensorType::Q8K => 15,
            TensorType::BF16 => 30,
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            TensorType::F32 | TensorType::F16 | TensorType::BF16 => 1,
            TensorType::Q4_0
            | TensorType::Q4_1
            | TensorType::Q5_0
            | TensorType::Q5_1
            | TensorType::Q8_0
            | TensorType::Q8_1 => 32,
            TensorType::Q2K
            | TensorType::Q3K
            | TensorType::Q4K
            | TensorType::Q5K
            | TensorType::Q6K
            | TensorType::Q8K => 256,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn type_size(self) -> usize {
        match self {
            TensorType::F32 => 4,
            TensorType::F16 | TensorType::BF16 => 2,
            // An f16 scale, then the values: 4, 5 or 8 bits each, 32 of them.
            TensorType::Q4_0 => 2 + 16,
            TensorType::Q4_1 => 2 + 2 + 16,
            TensorType::Q5_0 => 2 + 4 + 16,
            TensorType::Q5_1 => 2 + 2 + 4 + 16,
            TensorType::Q8_0 => 2 + 32,
            TensorType::Q8_1 => 2 + 2 + 32,
            // Super-blocks of 256: scales, quants and one or two f16 factors (Q8_K: an f32 and
            // 16 i16 sums).
            TensorType::Q2K => 16 + 64 + 2 + 2,
            TensorType::Q3K => 32 + 64 + 12 + 2,
            TensorType::Q4K => 2 + 2 + 12 + 128,
            TensorType::Q5K => 2 + 2 + 12 + 32 + 128,
            TensorType::Q6K => 128 + 64 + 16 + 2,
            TensorType::Q8K => 4 + 256 + 32,
        }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::TensorType;

    #[test]
    fn ids_round_trip_and_unknown_ids_are_refused() {
        for t in TensorType::ALL {
            assert_eq!(TensorType::from_id(t.id()), Some(t));
        }
        // Removed types (4, 5), the i-quants (16 on), and ids no ggml ever had.
        for id in [4, 5, 16, 20, 29, 31, 39, u32::MAX] {
            assert_eq!(TensorType::from_id(id), None, "id {id}");
        }
    }
}
