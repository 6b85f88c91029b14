//! Reading ONNX protobuf structures: tensors (inline and external data), attributes and value
//! types.

use std::path::Path;

use tract_onnx::pb::{self, AttributeProto, NodeProto, TensorProto};

use super::consts::{ConstTensor, SymInt};
use edgefold_runtime::format::DType;

/// ONNX element type codes (TensorProto.DataType).
pub mod onnx_type {
    /// float32
    pub const FLOAT: i32 = 1;
    /// uint8
    pub const UINT8: i32 = 2;
    /// int8
    pub const INT8: i32 = 3;
    /// uint16
    pub const UINT16: i32 = 4;
    /// int16
    pub const INT16: i32 = 5;
    /// int32
    pub const INT32: i32 = 6;
    /// int64
    pub const INT64: i32 = 7;
    /// bool
    pub const BOOL: i32 = 9;
    /// float16
    pub const FLOAT16: i32 = 10;
    /// float64
    pub const DOUBLE: i32 = 11;
    /// uint32
    pub const UINT32: i32 = 12;
    /// uint64
    pub const UINT64: i32 = 13;
    /// bfloat16
    pub const BFLOAT16: i32 = 16;
}

/// Returns the ONNX name of an element type code for messages (`"type 42"` for unknown codes).
pub fn type_name(onnx: i32) -> String {
    const NAMES: [&str; 27] = [
        "undefined",
        "float",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "int32",
        "int64",
        "string",
        "bool",
        "float16",
        "double",
        "uint32",
        "uint64",
        "complex64",
        "complex128",
        "bfloat16",
        "float8e4m3fn",
        "float8e4m3fnuz",
        "float8e5m2",
        "float8e5m2fnuz",
        "uint4",
        "int4",
        "float4e2m1",
        "float8e8m0",
        "uint2",
        "int2",
    ];
    match usize::try_from(onnx).ok().and_then(|i| NAMES.get(i)) {
        Some(name) => (*name).to_owned(),
        None => format!("type {onnx}"),
    }
}

/// The ONNX element type code of a runtime element type (int4 has none and gives int8).
pub fn onnx_code(dtype: DType) -> i32 {
    use onnx_type::*;
    match dtype {
        DType::F32 => FLOAT,
        DType::F16 => FLOAT16,
        DType::I8 | DType::I4 => INT8,
        DType::I32 => INT32,
        DType::I64 => INT64,
        DType::Bool => BOOL,
        DType::U8 => UINT8,
    }
}

/// The runtime element type used for an ONNX element type, if supported.
pub fn dtype_of(onnx: i32) -> Option<DType> {
    use onnx_type::*;
    Some(match onnx {
        FLOAT | FLOAT16 | DOUBLE | BFLOAT16 => DType::F32,
        INT64 | UINT32 | UINT64 => DType::I64,
        INT32 | INT16 | UINT16 => DType::I32,
        INT8 => DType::I8,
        UINT8 => DType::U8,
        BOOL => DType::Bool,
        _ => return None,
    })
}

/// Decodes a tensor, reading external data relative to `model_dir`.
pub fn tensor(t: &TensorProto, model_dir: &Path) -> Result<ConstTensor, String> {
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative extent {d}")))
        .collect::<Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let external;
    let raw: &[u8] = if t.data_location == Some(1) {
        external = read_external(t, model_dir)?;
        &external
    } else {
        &t.raw_data
    };
    use onnx_type::*;
    let dtype = dtype_of(t.data_type)
        .ok_or_else(|| format!("element type {} is not supported", t.data_type))?;
    let from_raw = |size: usize| -> Result<Option<&[u8]>, String> {
        if raw.is_empty() {
            return Ok(None);
        }
        if raw.len() != count * size {
            return Err(format!(
                "raw data has {} bytes, the shape needs {}",
                raw.len(),
                count * size
            ));
        }
        Ok(Some(raw))
    };
    let ints = |v: Vec<i64>| ConstTensor::Int {
        shape: shape.clone(),
        data: v.into_iter().map(SymInt::Int).collect(),
        dtype,
    };
    let floats = |v: Vec<f32>| ConstTensor::F32 { shape: shape.clone(), data: v };
    let result = match t.data_type {
        FLOAT => match from_raw(4)? {
            Some(r) => floats(
                r.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            None => floats(t.float_data.clone()),
        },
        DOUBLE => match from_raw(8)? {
            Some(r) => floats(
                r.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
            ),
            None => floats(t.double_data.iter().map(|&v| v as f32).collect()),
        },
        FLOAT16 | BFLOAT16 => {
            let bits: Vec<u16> = match from_raw(2)? {
                Some(r) => r.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect(),
                None => t.int32_data.iter().map(|&v| v as u16).collect(),
            };
            let conv = |b: u16| {
                if t.data_type == FLOAT16 {
                    half::f16::from_bits(b).to_f32()
                } else {
                    half::bf16::from_bits(b).to_f32()
                }
            };
            floats(bits.into_iter().map(conv).collect())
        }
        INT64 => match from_raw(8)? {
            Some(r) => {
                ints(r.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
            }
            None => ints(t.int64_data.clone()),
        },
        UINT64 => match from_raw(8)? {
            Some(r) => ints(
                r.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            None => ints(t.uint64_data.iter().map(|&v| v as i64).collect()),
        },
        UINT32 => match from_raw(4)? {
            Some(r) => ints(
                r.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            None => ints(t.uint64_data.iter().map(|&v| v as i64).collect()),
        },
        INT32 => match from_raw(4)? {
            Some(r) => ints(
                r.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            None => ints(t.int32_data.iter().map(|&v| v as i64).collect()),
        },
        INT16 | UINT16 => match from_raw(2)? {
            Some(r) => ints(
                r.chunks_exact(2)
                    .map(|c| {
                        let v = u16::from_le_bytes([c[0], c[1]]);
                        if t.data_type == INT16 {
                            v as i16 as i64
                        } else {
                            v as i64
                        }
                    })
                    .collect(),
            ),
            None => ints(t.int32_data.iter().map(|&v| v as i64).collect()),
        },
        INT8 => match from_raw(1)? {
            Some(r) => ints(r.iter().map(|&b| b as i8 as i64).collect()),
            None => ints(t.int32_data.iter().map(|&v| v as i8 as i64).collect()),
        },
        UINT8 | BOOL => match from_raw(1)? {
            Some(r) => ints(r.iter().map(|&b| b as i64).collect()),
            None => ints(t.int32_data.iter().map(|&v| v as i64).collect()),
        },
        other => return Err(format!("element type {other} is not supported")),
    };
    let len = match &result {
        ConstTensor::F32 { data, .. } => data.len(),
        ConstTensor::Int { data, .. } => data.len(),
    };
    if len != count {
        return Err(format!("tensor has {len} values but its shape {shape:?} needs {count}"));
    }
    Ok(result)
}

fn read_external(t: &TensorProto, model_dir: &Path) -> Result<Vec<u8>, String> {
    let field = |key: &str| t.external_data.iter().find(|e| e.key == key).map(|e| e.value.clone());
    let location = field("location").ok_or("external data without a location")?;
    let offset: u64 = field("offset").map(|v| v.parse().unwrap_or(0)).unwrap_or(0);
    let path = model_dir.join(&location);
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("cannot read external data {}: {e}", path.display()))?;
    let start = offset as usize;
    let len = match field("length") {
        Some(v) => v.parse::<usize>().map_err(|_| format!("invalid external data length {v}"))?,
        None => bytes.len().saturating_sub(start),
    };
    bytes
        .get(start..start + len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| format!("external data {} is shorter than offset + length", path.display()))
}

/// Looks up an attribute by name.
pub fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// An integer attribute, or `default`.
pub fn attr_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

/// A float attribute, or `default`.
pub fn attr_float(node: &NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map_or(default, |a| a.f)
}

/// An integer list attribute.
pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

/// A string attribute.
pub fn attr_string(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

/// Element type and extents (None for unknown ones) of a graph input or output.
pub fn value_type(v: &pb::ValueInfoProto) -> Option<(i32, Vec<DimSpec>)> {
    let ty = v.r#type.as_ref()?;
    let pb::type_proto::Value::TensorType(tensor) = ty.value.as_ref()?;
    let dims = tensor
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => {
                        match u32::try_from(*v) {
                            Ok(v) => DimSpec::Fixed(v),
                            Err(_) => DimSpec::Unknown,
                        }
                    }
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(0)) => DimSpec::Empty,
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(p))
                        if !p.is_empty() =>
                    {
                        DimSpec::Named(p.clone())
                    }
                    _ => DimSpec::Unknown,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((tensor.elem_type, dims))
}

/// One extent of a declared input shape.
#[derive(Clone, Debug, PartialEq)]
pub enum DimSpec {
    /// A fixed extent.
    Fixed(u32),
    /// A fixed extent of 0: the tensor has no elements.
    Empty,
    /// A named variable extent.
    Named(String),
    /// Neither fixed nor named.
    Unknown,
}
