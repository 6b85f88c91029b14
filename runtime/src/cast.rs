//! Typed views of byte slices for plain element types.

mod sealed {
    pub trait Sealed {}
}

/// Element types for which every bit pattern is a valid value, so a byte slice of the right
/// alignment and length can be viewed as a slice of them.
pub trait Plain: sealed::Sealed + Copy + 'static {}

macro_rules! plain {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl Plain for $t {}
    )*};
}
plain!(u8, i8, u16, u32, i32, f32, u64, i64);

/// Views `bytes` as a slice of `T`; `None` when misaligned or not a whole number of elements.
pub fn cast<T: Plain>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: `T: Plain` guarantees that every bit pattern is a valid `T`; `align_to` returns a
    // middle part that is correctly aligned, and we only accept the case where it covers all bytes.
    let (head, body, tail) = unsafe { bytes.align_to::<T>() };
    (head.is_empty() && tail.is_empty()).then_some(body)
}

/// Mutable counterpart of [`cast`].
pub fn cast_mut<T: Plain>(bytes: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: as in `cast`; any value written through the typed slice is a valid byte pattern.
    let (head, body, tail) = unsafe { bytes.align_to_mut::<T>() };
    (head.is_empty() && tail.is_empty()).then_some(body)
}

/// Views a slice of `T` as bytes.
pub fn as_bytes<T: Plain>(values: &[T]) -> &[u8] {
    // SAFETY: `T: Plain` has no padding and no invalid bit patterns, and `u8` has alignment 1, so
    // the same memory is a valid byte slice of `size_of_val(values)` bytes.
    unsafe {
        core::slice::from_raw_parts(values.as_ptr() as *const u8, core::mem::size_of_val(values))
    }
}
