//! A weight matrix and its product with activations: phi3's own GEMV kernels for a single row
//! (every decode step), candle's quantized matmul for batches (prefill).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::error::Result;
use crate::kernels;

pub struct Linear {
    /// `(rows, cols)`: `rows` outputs of `cols` inputs each.
    weight: Arc<QTensor>,
    batched: QMatMul,
    rows: usize,
    cols: usize,
}

impl Linear {
    pub fn new(weight: Arc<QTensor>) -> Result<Self> {
        let (rows, cols) = weight.shape().dims2()?;
        Ok(Self {
            batched: QMatMul::from_arc(weight.clone())?,
            weight,
            rows,
            cols,
        })
    }

    /// `x`: `(seq, cols)` → `(seq, rows)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let seq = x.dim(0)?;
        if seq != 1 || !kernels::SUPPORTED.contains(&self.weight.dtype()) {
            return Ok(self.batched.forward(x)?);
        }
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; self.rows];
        kernels::gemv(
            self.weight.dtype(),
            &self.weight.data()?,
            self.rows,
            self.cols,
            &input,
            &mut out,
        )?;
        Ok(Tensor::from_vec(out, (1, self.rows), &Device::Cpu)?)
    }
}
