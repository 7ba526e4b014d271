//! `phi3.cpu_info()`: which kernels run on this CPU and why, as a dict (typed as
//! `phi3.CpuInfo` in Python).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::kernels::cpu_info::cpu_info as gather;
use crate::kernels::CpuLevel;

/// Which kernels phi3 uses on this CPU and why: the level in use, the reason, the CPU's own
/// level, the `PHI3_CPU` override, the build's baseline and the features seen.
#[pyfunction]
pub fn cpu_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let info = gather();
    let d = PyDict::new(py);
    d.set_item("level", info.level.name())?;
    d.set_item("reason", &info.reason)?;
    d.set_item("hardware_level", info.hardware_level.name())?;
    let available: Vec<&str> = info
        .available_levels()
        .into_iter()
        .map(CpuLevel::name)
        .collect();
    d.set_item("available_levels", available)?;
    match &info.requested {
        None => d.set_item("override", py.None())?,
        Some(o) => {
            let od = PyDict::new(py);
            od.set_item("value", &o.value)?;
            od.set_item("status", o.status.name())?;
            d.set_item("override", od)?;
        }
    }
    d.set_item("baseline", info.baseline)?;
    d.set_item("baseline_features", &info.baseline_features)?;
    let features = PyDict::new(py);
    for (name, has) in &info.features {
        features.set_item(name, has)?;
    }
    d.set_item("features", features)?;
    d.set_item("amx_claimed", info.amx_claimed)?;
    d.set_item("arch", info.arch)?;
    d.set_item("os", info.os)?;
    Ok(d)
}
