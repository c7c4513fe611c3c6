//! Reads named float initializers (the shared weights W0) out of an ONNX model with minimal hand-written protobuf structs.
//!
//! Only the fields lorkd needs are declared; prost skips every other field, so no protoc or full ONNX schema is needed.

use std::collections::HashMap;

use prost::Message;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    /// `TypeProto.tensor_type` (a oneof member on the wire, a plain optional field here).
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<DimensionProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DimensionProto {
    /// `dim_value` / `dim_param` form a oneof in ONNX; at most one is set.
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// One dimension of a graph input: a fixed size, or free (named like `batch`, or unnamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Free,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Free => write!(f, "?"),
        }
    }
}

/// Whether a graph input of `dims` (NCHW) takes a `[batch, 3, height, width]` image tensor. `None` dims (the graph
/// declares no shape) cannot be checked and are accepted. The error names sizes only.
pub fn check_image_input(dims: Option<&[Dim]>, height: usize, width: usize) -> Result<(), String> {
    let Some(dims) = dims else { return Ok(()) };
    let shown = || {
        dims.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if dims.len() != 4 {
        return Err(format!(
            "the model's image input has shape [{}], not [batch, 3, height, width]",
            shown()
        ));
    }
    let fits = |d: &Dim, want: usize| match d {
        Dim::Fixed(n) => *n == want as i64,
        Dim::Free => true,
    };
    if !fits(&dims[1], 3) {
        return Err(format!(
            "the model's image input has shape [{}]: it does not take 3 channels",
            shown()
        ));
    }
    if !fits(&dims[2], height) || !fits(&dims[3], width) {
        return Err(format!(
            "task input size {height}x{width} (height x width) does not fit the model's image input [{}], which takes {}x{}",
            shown(),
            dims[2],
            dims[3]
        ));
    }
    Ok(())
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    /// 1 = EXTERNAL (weights in a side file): not allowed by the package format.
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

/// ONNX `TensorProto.DataType.FLOAT`.
const ONNX_FLOAT: i32 = 1;

/// A float tensor read from the model.
#[derive(Debug, Clone, PartialEq)]
pub struct FloatTensor {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// The parts of a model lorkd checks: graph input names (and dims, when declared) and the requested float
/// initializers.
#[derive(Debug)]
pub struct ModelInfo {
    pub input_names: Vec<String>,
    /// Declared dims of each graph input that has a tensor shape.
    pub input_dims: HashMap<String, Vec<Dim>>,
    pub initializers: HashMap<String, FloatTensor>,
}

/// Decodes `model_bytes` and returns the graph inputs plus the float initializers named in `wanted`.
pub fn read_model(model_bytes: &[u8], wanted: &[&str]) -> Result<ModelInfo, String> {
    let model = ModelProto::decode(model_bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = model.graph.ok_or("ONNX model has no graph")?;
    let mut initializers = HashMap::new();
    for tensor in graph.initializer {
        if !wanted.contains(&tensor.name.as_str()) {
            continue;
        }
        let name = tensor.name.clone();
        initializers.insert(
            name.clone(),
            float_tensor(tensor).map_err(|e| format!("initializer `{name}`: {e}"))?,
        );
    }
    let input_dims = graph
        .input
        .iter()
        .filter_map(|i| {
            let shape = i.r#type.as_ref()?.tensor_type.as_ref()?.shape.as_ref()?;
            let dims = shape
                .dim
                .iter()
                .map(|d| match d.dim_value {
                    Some(n) if n > 0 => Dim::Fixed(n),
                    _ => Dim::Free,
                })
                .collect();
            Some((i.name.clone(), dims))
        })
        .collect();
    Ok(ModelInfo {
        input_names: graph.input.into_iter().map(|i| i.name).collect(),
        input_dims,
        initializers,
    })
}

fn float_tensor(tensor: TensorProto) -> Result<FloatTensor, String> {
    if tensor.data_type != ONNX_FLOAT {
        return Err(format!("data type {} is not float32", tensor.data_type));
    }
    if tensor.data_location == 1 {
        return Err(
            "weights are stored as external data; the package format requires them inline".into(),
        );
    }
    let dims = tensor
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
        .collect::<Result<Vec<_>, _>>()?;
    let count: usize = dims.iter().product();
    let data = if !tensor.raw_data.is_empty() {
        if tensor.raw_data.len() != count * 4 {
            return Err(format!(
                "raw data holds {} bytes, dims {:?} need {}",
                tensor.raw_data.len(),
                dims,
                count * 4
            ));
        }
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        if tensor.float_data.len() != count {
            return Err(format!(
                "holds {} floats, dims {:?} need {count}",
                tensor.float_data.len(),
                dims
            ));
        }
        tensor.float_data
    };
    Ok(FloatTensor { dims, data })
}

/// One protobuf field as found on the wire: number, the whole encoded field, and its payload when length-delimited.
struct RawField<'a> {
    number: u32,
    whole: &'a [u8],
    payload: Option<&'a [u8]>,
}

fn raw_fields(bytes: &[u8]) -> Result<Vec<RawField<'_>>, String> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut fields = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let start = rest;
        let (number, wire_type) =
            decode_key(&mut rest).map_err(|e| format!("bad protobuf key: {e}"))?;
        let mut payload = None;
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut rest).map_err(|e| format!("bad varint: {e}"))?;
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let width = if wire_type == WireType::SixtyFourBit {
                    8
                } else {
                    4
                };
                rest = rest.get(width..).ok_or("truncated fixed-width field")?;
            }
            WireType::LengthDelimited => {
                let length =
                    decode_varint(&mut rest).map_err(|e| format!("bad length: {e}"))? as usize;
                payload = Some(
                    rest.get(..length)
                        .ok_or("truncated length-delimited field")?,
                );
                rest = &rest[length..];
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err("protobuf groups are not used by ONNX".into())
            }
        }
        let consumed = start.len() - rest.len();
        fields.push(RawField {
            number,
            whole: &start[..consumed],
            payload,
        });
    }
    Ok(fields)
}

fn push_length_delimited(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A float tensor to bake into a model as a plain initializer.
pub struct Bake<'a> {
    pub name: &'a str,
    pub dims: &'a [usize],
    pub data: &'a [f32],
}

/// Rewrites `model_bytes` so that every tensor in `bake` is a plain (non-overridable) initializer and is no longer a
/// graph input: a standalone expert that ONNX Runtime can constant-fold and pre-pack. Every other byte of the model
/// (nodes, opsets, metadata, other initializers) is copied unchanged at the wire level.
pub fn bake_initializers(model_bytes: &[u8], bake: &[Bake<'_>]) -> Result<Vec<u8>, String> {
    let names: std::collections::HashSet<&str> = bake.iter().map(|b| b.name).collect();
    let mut model = Vec::with_capacity(model_bytes.len());
    let mut saw_graph = false;
    for field in raw_fields(model_bytes)? {
        let (7, Some(graph_bytes)) = (field.number, field.payload) else {
            model.extend_from_slice(field.whole);
            continue;
        };
        saw_graph = true;
        let mut graph = Vec::with_capacity(graph_bytes.len());
        for g in raw_fields(graph_bytes)? {
            let skip = match (g.number, g.payload) {
                (5, Some(p)) => names.contains(
                    TensorProto::decode(p)
                        .map_err(|e| format!("bad initializer: {e}"))?
                        .name
                        .as_str(),
                ),
                (11, Some(p)) => names.contains(
                    ValueInfoProto::decode(p)
                        .map_err(|e| format!("bad graph input: {e}"))?
                        .name
                        .as_str(),
                ),
                _ => false,
            };
            if !skip {
                graph.extend_from_slice(g.whole);
            }
        }
        for tensor in bake {
            let proto = TensorProto {
                dims: tensor.dims.iter().map(|&d| d as i64).collect(),
                data_type: ONNX_FLOAT,
                name: tensor.name.to_string(),
                raw_data: tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ..Default::default()
            };
            push_length_delimited(&mut graph, 5, &proto.encode_to_vec());
        }
        push_length_delimited(&mut model, 7, &graph);
    }
    if !saw_graph {
        return Err("ONNX model has no graph".into());
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_input(dims: Vec<DimensionProto>) -> Vec<u8> {
        ModelProto {
            graph: Some(GraphProto {
                initializer: vec![],
                input: vec![ValueInfoProto {
                    name: "input".into(),
                    r#type: Some(TypeProto {
                        tensor_type: Some(TensorTypeProto {
                            elem_type: 1,
                            shape: Some(TensorShapeProto { dim: dims }),
                        }),
                    }),
                }],
            }),
        }
        .encode_to_vec()
    }

    fn fixed(n: i64) -> DimensionProto {
        DimensionProto {
            dim_value: Some(n),
            dim_param: None,
        }
    }

    fn named(p: &str) -> DimensionProto {
        DimensionProto {
            dim_value: None,
            dim_param: Some(p.into()),
        }
    }

    #[test]
    fn reads_graph_input_dims_fixed_and_free() {
        let bytes = image_input(vec![named("batch"), fixed(3), fixed(28), fixed(28)]);
        let info = read_model(&bytes, &[]).unwrap();
        let dims = &info.input_dims["input"];
        assert_eq!(
            dims,
            &vec![Dim::Free, Dim::Fixed(3), Dim::Fixed(28), Dim::Fixed(28)]
        );
        assert!(check_image_input(Some(dims), 28, 28).is_ok());
        let err = check_image_input(Some(dims), 64, 64).unwrap_err();
        assert!(err.contains("64x64") && err.contains("28x28"), "{err}");
        assert!(err.contains("[?, 3, 28, 28]"), "{err}");
    }

    #[test]
    fn free_spatial_dims_take_any_size_and_other_shapes_are_refused() {
        let free = [Dim::Free, Dim::Fixed(3), Dim::Free, Dim::Free];
        assert!(check_image_input(Some(&free), 224, 160).is_ok());
        assert!(check_image_input(None, 5, 5).is_ok());
        let grey = [Dim::Free, Dim::Fixed(1), Dim::Fixed(28), Dim::Fixed(28)];
        assert!(check_image_input(Some(&grey), 28, 28)
            .unwrap_err()
            .contains("3 channels"));
        let flat = [Dim::Free, Dim::Fixed(784)];
        assert!(check_image_input(Some(&flat), 28, 28)
            .unwrap_err()
            .contains("not [batch, 3, height, width]"));
        let wide = [Dim::Free, Dim::Fixed(3), Dim::Fixed(28), Dim::Fixed(32)];
        assert!(check_image_input(Some(&wide), 28, 28).is_err());
    }

    fn model_with(tensors: Vec<TensorProto>) -> Vec<u8> {
        ModelProto {
            graph: Some(GraphProto {
                initializer: tensors,
                input: vec![
                    ValueInfoProto {
                        name: "input".into(),
                        r#type: None,
                    },
                    ValueInfoProto {
                        name: "w".into(),
                        r#type: None,
                    },
                ],
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn reads_raw_and_float_data_initializers() {
        let raw: Vec<u8> = [1.0f32, -2.5, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = model_with(vec![
            TensorProto {
                dims: vec![2, 2],
                data_type: 1,
                raw_data: raw,
                name: "w".into(),
                ..Default::default()
            },
            TensorProto {
                dims: vec![2],
                data_type: 1,
                float_data: vec![0.5, 0.25],
                name: "b".into(),
                ..Default::default()
            },
            TensorProto {
                dims: vec![1],
                data_type: 7,
                name: "ignored".into(),
                ..Default::default()
            },
        ]);
        let info = read_model(&bytes, &["w", "b"]).unwrap();
        assert_eq!(info.input_names, ["input", "w"]);
        assert_eq!(
            info.initializers["w"],
            FloatTensor {
                dims: vec![2, 2],
                data: vec![1.0, -2.5, 3.0, 4.0]
            }
        );
        assert_eq!(info.initializers["b"].data, [0.5, 0.25]);
        assert!(!info.initializers.contains_key("ignored"));
    }

    #[test]
    fn baking_turns_inputs_into_plain_initializers_and_keeps_the_rest() {
        let raw: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = model_with(vec![
            TensorProto {
                dims: vec![2],
                data_type: 1,
                raw_data: raw,
                name: "w".into(),
                ..Default::default()
            },
            TensorProto {
                dims: vec![1],
                data_type: 1,
                float_data: vec![9.0],
                name: "keep".into(),
                ..Default::default()
            },
        ]);
        let baked = bake_initializers(
            &bytes,
            &[
                Bake {
                    name: "w",
                    dims: &[2],
                    data: &[5.0, 6.0],
                },
                Bake {
                    name: "head",
                    dims: &[1],
                    data: &[7.0],
                },
            ],
        )
        .unwrap();
        let info = read_model(&baked, &["w", "keep", "head"]).unwrap();
        assert_eq!(info.input_names, ["input"]);
        assert_eq!(info.initializers["w"].data, [5.0, 6.0]);
        assert_eq!(info.initializers["keep"].data, [9.0]);
        assert_eq!(info.initializers["head"].data, [7.0]);
        assert!(bake_initializers(b"", &[]).is_err());
    }

    #[test]
    fn rejects_wrong_types_and_sizes() {
        let bytes = model_with(vec![TensorProto {
            dims: vec![3],
            data_type: 1,
            float_data: vec![1.0],
            name: "w".into(),
            ..Default::default()
        }]);
        assert!(read_model(&bytes, &["w"]).unwrap_err().contains("need 3"));
        let bytes = model_with(vec![TensorProto {
            dims: vec![1],
            data_type: 11,
            name: "w".into(),
            ..Default::default()
        }]);
        assert!(read_model(&bytes, &["w"])
            .unwrap_err()
            .contains("not float32"));
        assert!(read_model(b"\xff\xff\xff garbage", &[]).is_err());
    }
}
