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

/// The parts of a model lorkd checks: graph input names and the requested float initializers.
#[derive(Debug)]
pub struct ModelInfo {
    pub input_names: Vec<String>,
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
    Ok(ModelInfo {
        input_names: graph.input.into_iter().map(|i| i.name).collect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with(tensors: Vec<TensorProto>) -> Vec<u8> {
        ModelProto {
            graph: Some(GraphProto {
                initializer: tensors,
                input: vec![
                    ValueInfoProto {
                        name: "input".into(),
                    },
                    ValueInfoProto { name: "w".into() },
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
