//! Compute kernels. `generic` holds the portable versions every target can run; CPU-specific
//! versions are added beside it and chosen at run time. `conv` contains the portable convolution
//! and pooling kernels.

pub mod conv;
pub mod generic;
