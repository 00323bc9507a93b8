//! m3serve's gateway: the one HTTP endpoint agent frameworks talk to.
//!
//! Built by maturin into the Python package as `m3serve._gateway`.
use pyo3::prelude::*;

/// Version of the gateway crate, so Python can check it loaded the extension it was built with.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _gateway(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
