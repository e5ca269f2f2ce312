//! Pattern search, selection and index build on the GPU (owned by CUDA helper B).
//!
//! Placeholder: the device-side selection (gamma cut by threshold, CSR build with forced
//! blocks and budgets, no host sync) lands here and produces a
//! [`crate::attention::DeviceBlockIndex`] for the attention kernel.
