//! The PyO3 binding: the only module that knows Python. Every call that does real work releases
//! the GIL, catches panics, and turns engine errors into the exception classes of `errors.rs`.

mod chat;
mod convert;
mod cpu;
mod errors;
mod model;
mod options;
mod stream;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(cpu::cpu_info, m)?)?;
    m.add_class::<model::PyPhi3>()?;
    m.add_class::<chat::PyChat>()?;
    m.add_class::<stream::PyStream>()?;
    m.add_class::<stream::PyToken>()?;
    m.add_class::<stream::PyStats>()?;
    errors::register(m)?;
    Ok(())
}
