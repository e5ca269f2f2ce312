//! Errors as Python sees them: `flexprefill.InvalidInputError` (a `ValueError`) for anything the
//! caller can fix in the arguments, `flexprefill.DeviceError` (a `RuntimeError`) for a device
//! that cannot run the call; both subclass `flexprefill.FlexPrefillError` and carry the name of
//! the offending argument in `.argument`.
//!
//! The classes are defined in Python (`flexprefill/_errors.py`) so they can inherit from both
//! `FlexPrefillError` and the builtin; we look them up only when raising.

use flexprefill_core::Error;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

/// Which builtin the raised class derives from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Fixable in the arguments: `InvalidInputError(ValueError)`.
    Value,
    /// The device cannot run it: `DeviceError(RuntimeError)`.
    Runtime,
}

/// An error on its way to Python.
#[derive(Debug, Clone)]
pub(crate) struct ArgError {
    pub kind: Kind,
    /// The argument at fault (`q`, `cu_seqlens_k`, `gamma`, ...), when there is one.
    pub argument: Option<&'static str>,
    pub message: String,
}

impl ArgError {
    pub fn value(argument: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: Kind::Value,
            argument: Some(argument),
            message: message.into(),
        }
    }

    pub fn runtime(argument: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: Kind::Runtime,
            argument: Some(argument),
            message: message.into(),
        }
    }

    /// Turns a core error into one naming the argument at fault. `varlen` decides whether
    /// per-sequence length errors point at `cu_seqlens_q` or at the tensors.
    pub fn from_core(e: Error, varlen: bool) -> Self {
        let message = e.to_string();
        let argument: Option<&'static str> = match &e {
            Error::Config(m) => knob_name(m),
            Error::GqaRatio { .. } => Some("k"),
            Error::HeadDim(_) => Some("q"),
            Error::EmptySequence { q_len, .. } => Some(match (varlen, *q_len == 0) {
                (true, true) => "cu_seqlens_q",
                (true, false) => "cu_seqlens_k",
                (false, true) => "q",
                (false, false) => "k",
            }),
            Error::QueryLongerThanKeys { .. } => Some(if varlen { "cu_seqlens_q" } else { "q" }),
            Error::CuSeqlens(m) => {
                if m.starts_with("cu_seqlens_k") {
                    Some("cu_seqlens_k")
                } else {
                    Some("cu_seqlens_q")
                }
            }
            Error::NonFinite { tensor, .. } => match *tensor {
                "k" => Some("k"),
                "v" => Some("v"),
                _ => Some("q"),
            },
            Error::DType { .. } => Some("k"),
            _ => None,
        };
        let kind = match e {
            Error::Backend { .. } | Error::Index(_) => Kind::Runtime,
            _ => Kind::Value,
        };
        // Core's messages name values, not always the argument ("head_dim (300) ...").
        let message = match argument {
            Some(a) if !names(&message, a) => format!("{a}: {message}"),
            _ => message,
        };
        Self {
            kind,
            argument,
            message,
        }
    }

    /// The Python exception: our class when the package is importable, the builtin otherwise.
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let class = match self.kind {
            Kind::Value => "InvalidInputError",
            Kind::Runtime => "DeviceError",
        };
        let raised = py
            .import("flexprefill._errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.call1((self.message.clone(), self.argument)));
        match raised {
            Ok(instance) => PyErr::from_value(instance),
            Err(_) => match self.kind {
                Kind::Value => PyValueError::new_err(self.message),
                Kind::Runtime => PyRuntimeError::new_err(self.message),
            },
        }
    }
}

/// The knob a config message is about: core's messages start with its name (`gamma (1.5) ...`).
fn knob_name(message: &str) -> Option<&'static str> {
    const KNOBS: [&str; 6] = [
        "gamma",
        "tau",
        "block_size",
        "min_budget",
        "max_budget",
        "softmax_scale",
    ];
    KNOBS.into_iter().find(|k| {
        message
            .strip_prefix(k)
            .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with(':'))
    })
}

/// True when `message` has `word` as a whole identifier (so `k` is not found in `kv_len`).
fn names(message: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    message.match_indices(word).any(|(i, _)| {
        let before = message[..i].chars().next_back();
        let after = message[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}
