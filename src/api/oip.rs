//! KServe Open Inference Protocol v2 (REST): health, model metadata/readiness, FP32 tensor inference, with the
//! binary tensor data extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data` outputs).

use axum::{
    extract::{Path, Request, State},
    http::{header, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{check_content_length, read_body};
use crate::{
    error::{ApiError, OipError},
    package::ExpertStatus,
    state::AppState,
};

/// Header giving the length of the JSON part of a request or response that carries binary tensor data.
pub static INFERENCE_HEADER_CONTENT_LENGTH: HeaderName =
    HeaderName::from_static("inference-header-content-length");

pub async fn server_metadata() -> Json<Value> {
    Json(
        json!({"name": "lorkd", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}),
    )
}

pub async fn live(State(state): State<AppState>) -> Response {
    // A process whose inference thread has ended cannot recover by itself: let the orchestrator restart it.
    let live = state.is_live();
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"live": live}))).into_response()
}

pub async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready}))).into_response()
}

fn unknown(task: &str) -> OipError {
    OipError(ApiError::NotFound(format!("unknown model `{task}`")))
}

pub async fn model_metadata(
    State(state): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<Value>, OipError> {
    let entry = state.experts.get(&task).ok_or_else(|| unknown(&task))?;
    let input = &entry.spec.input;
    let model = &state.package.manifest.model;
    Ok(Json(json!({
        "name": task,
        "versions": entry.version.iter().collect::<Vec<_>>(),
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, 3, input.height, input.width]}],
        "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, entry.spec.num_classes]}],
    })))
}

pub async fn model_ready(
    State(state): State<AppState>,
    Path(task): Path<String>,
) -> Result<Response, OipError> {
    let entry = state.experts.get(&task).ok_or_else(|| unknown(&task))?;
    let ready = entry.status == ExpertStatus::Available && state.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(json!({"name": task, "ready": ready}))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub inputs: Vec<InferInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
    #[serde(default)]
    pub parameters: Option<RequestParameters>,
}

/// Request-level parameters we act on (others are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct RequestParameters {
    /// Binary tensor extension: every output in binary unless an output says otherwise.
    #[serde(default)]
    pub binary_data_output: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct InferInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// JSON values; absent when the tensor travels in the binary part (`parameters.binary_data_size`).
    #[serde(default)]
    pub data: Option<Fp32Data>,
    #[serde(default)]
    pub parameters: Option<TensorParameters>,
}

/// Per-tensor parameters of the binary tensor extension.
#[derive(Debug, Default, Deserialize)]
pub struct TensorParameters {
    /// Input: bytes of this tensor in the binary part (little-endian, row-major).
    #[serde(default)]
    pub binary_data_size: Option<u64>,
    /// Output: answer this tensor in binary.
    #[serde(default)]
    pub binary_data: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<TensorParameters>,
}

#[derive(Debug, Serialize)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// lorkd's own: how the request ran (`execution` = `merged` or `mixed`, `batch_size` = images in its run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    pub outputs: Vec<OutputTensor>,
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

/// Tensor `data` read straight from the JSON text into f32 (flat or nested arrays, row-major), without building a
/// `serde_json::Value` tree (which costs ~30 bytes per number). Problems are recorded, not raised, so that the
/// request's shape and datatype are still checked and reported first.
#[derive(Debug, Default, PartialEq)]
pub struct Fp32Data {
    pub values: Vec<f32>,
    /// Numbers read but not kept because the tensor already held [`value_limit`] values.
    pub dropped: usize,
    pub problem: Option<&'static str>,
}

thread_local! {
    /// Most values one tensor keeps while parsing (set by [`parse_request`] on its thread; default unbounded).
    static VALUE_LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

fn value_limit() -> usize {
    VALUE_LIMIT.with(|l| l.get())
}

/// Parses an inference request, keeping at most `max_values` numbers of a tensor's `data` in memory (the rest
/// are counted, so the request still fails with a precise shape error), so that the memory a JSON body can make
/// us hold is bounded by the per-request image cap, not by the body size.
pub fn parse_request(bytes: &[u8], max_values: usize) -> Result<InferRequest, serde_json::Error> {
    let previous = VALUE_LIMIT.with(|l| l.replace(max_values));
    let parsed = serde_json::from_slice::<InferRequest>(bytes);
    VALUE_LIMIT.with(|l| l.set(previous));
    parsed
}

const NON_FINITE: &str = "tensor data holds NaN or infinite values (or values beyond FP32 range)";
const NOT_NUMBER: &str = "tensor data must hold only numbers (NaN/Infinity are not allowed)";

impl<'de> Deserialize<'de> for Fp32Data {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut data = Fp32Data::default();
        deserializer.deserialize_any(Fp32Visitor(&mut data))?;
        Ok(data)
    }
}

struct Fp32Visitor<'a>(&'a mut Fp32Data);

impl Fp32Visitor<'_> {
    fn push(self, value: f64) {
        let value = value as f32;
        if !value.is_finite() {
            self.0.problem.get_or_insert(NON_FINITE);
        } else if self.0.values.len() < value_limit() {
            self.0.values.push(value);
        } else {
            self.0.dropped += 1;
        }
    }
    fn not_a_number(self) {
        self.0.problem.get_or_insert(NOT_NUMBER);
    }
}

impl<'de> serde::de::Visitor<'de> for Fp32Visitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("numbers, or (nested) arrays of numbers")
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.push(v);
        Ok(())
    }
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.push(v as f64);
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.push(v as f64);
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.not_a_number();
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.not_a_number();
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.not_a_number();
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Fp32Seed(&mut *self.0))?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        self.not_a_number();
        Ok(())
    }
}

struct Fp32Seed<'a>(&'a mut Fp32Data);

impl<'de> serde::de::DeserializeSeed<'de> for Fp32Seed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(Fp32Visitor(self.0))
    }
}

/// A request body split by `Inference-Header-Content-Length`: the JSON part and the binary tensor part.
pub fn split_body<'a>(
    body: &'a [u8],
    header_length: Option<&str>,
) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(text) = header_length else {
        return Ok((body, &[]));
    };
    let length = text.trim().parse::<usize>().map_err(|_| {
        bad(
            "bad_header",
            format!("Inference-Header-Content-Length must be a byte count, got `{text}`"),
        )
    })?;
    if length > body.len() {
        return Err(bad(
            "bad_header",
            format!(
                "Inference-Header-Content-Length is {length} but the body has only {} bytes",
                body.len()
            ),
        ));
    }
    Ok(body.split_at(length))
}

/// Checks an inference request against the model and returns `(images, data)` (the data is moved out). Tensor
/// data comes from JSON `data` or, with `parameters.binary_data_size`, from `binary` (the body after the JSON
/// header). `max_images` is the per-request image cap (413 above it, before any tensor is converted).
pub fn validate(
    request: &mut InferRequest,
    binary: &[u8],
    model: &ModelIo<'_>,
) -> Result<(usize, Vec<f32>), ApiError> {
    let (input_name, output_name, height, width) = (
        model.input_name,
        model.output_name,
        model.height,
        model.width,
    );
    let [input] = &mut request.inputs[..] else {
        return Err(bad(
            "bad_tensor",
            format!(
                "expected exactly one input tensor `{input_name}`, got {}",
                request.inputs.len()
            ),
        ));
    };
    if input.name != input_name {
        return Err(bad(
            "bad_tensor",
            format!(
                "unknown input `{}`; the model's input is `{input_name}`",
                input.name
            ),
        ));
    }
    if input.datatype != "FP32" {
        return Err(bad(
            "bad_datatype",
            format!(
                "input datatype is `{}`; the model takes FP32",
                input.datatype
            ),
        ));
    }
    let expected_tail = [3, height as i64, width as i64];
    if input.shape.len() != 4 || input.shape[1..] != expected_tail || input.shape[0] < 1 {
        return Err(bad(
            "bad_shape",
            format!(
                "input shape is {:?}; the model takes [N, 3, {height}, {width}] with N >= 1",
                input.shape
            ),
        ));
    }
    // The declared shape is untrusted: never size an allocation from it (a huge N must be a 4xx, not an abort).
    let images = usize::try_from(input.shape[0]).unwrap_or(usize::MAX);
    if images > model.max_images as usize {
        return Err(ApiError::TooManyImages {
            images,
            limit: model.max_images,
        });
    }
    let needed = images.checked_mul(3 * height * width);
    let binary_size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
    let data = match (binary_size, input.data.take()) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "bad_tensor",
                "input has both `data` and `binary_data_size`; send one",
            ))
        }
        (None, None) => {
            return Err(bad(
                "bad_tensor",
                "input has neither `data` nor `parameters.binary_data_size`",
            ))
        }
        (None, Some(json)) => {
            if !binary.is_empty() {
                return Err(bad(
                    "bad_tensor",
                    format!(
                        "the body carries {} bytes of binary data but no input declares binary_data_size",
                        binary.len()
                    ),
                ));
            }
            if let Some(problem) = json.problem {
                return Err(bad("bad_tensor", problem));
            }
            if json.dropped > 0 {
                // More numbers than the image cap allows were sent (only the first ones were kept).
                return Err(bad(
                    "bad_shape",
                    format!(
                        "input holds more than {} values; shape {:?} needs N x 3 x {height} x {width}",
                        json.values.len(),
                        input.shape
                    ),
                ));
            }
            json.values
        }
        (Some(size), None) => {
            if size != binary.len() as u64 {
                return Err(bad(
                    "bad_tensor",
                    format!(
                        "binary_data_size is {size} but the binary part of the body has {} bytes",
                        binary.len()
                    ),
                ));
            }
            if needed.and_then(|n| n.checked_mul(4)) != Some(binary.len()) {
                return Err(bad(
                    "bad_shape",
                    format!(
                        "binary input holds {} bytes; shape {:?} needs N x 3 x {height} x {width} x 4 (FP32)",
                        binary.len(),
                        input.shape
                    ),
                ));
            }
            let values: Vec<f32> = binary
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(bad("bad_tensor", NON_FINITE));
            }
            values
        }
    };
    if needed != Some(data.len()) {
        return Err(bad(
            "bad_shape",
            format!(
                "input holds {} values; shape {:?} needs N x 3 x {height} x {width}",
                data.len(),
                input.shape
            ),
        ));
    }
    if let Some(outputs) = &request.outputs {
        if let Some(other) = outputs.iter().find(|o| o.name != output_name) {
            return Err(bad(
                "bad_output",
                format!(
                    "unknown output `{}`; the model's output is `{output_name}`",
                    other.name
                ),
            ));
        }
    }
    Ok((images, data))
}

/// What `validate` checks a request against.
pub struct ModelIo<'a> {
    pub input_name: &'a str,
    pub output_name: &'a str,
    pub height: usize,
    pub width: usize,
    pub max_images: u32,
}

/// Whether the output is answered in binary: its own `binary_data`, else the request's `binary_data_output`.
fn binary_output(request: &InferRequest) -> bool {
    let default = request
        .parameters
        .as_ref()
        .and_then(|p| p.binary_data_output)
        .unwrap_or(false);
    request
        .outputs
        .as_ref()
        .and_then(|outputs| outputs.first())
        .and_then(|o| o.parameters.as_ref())
        .and_then(|p| p.binary_data)
        .unwrap_or(default)
}

/// `POST /v2/models/{task}/infer`
pub async fn infer(
    State(state): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Response, OipError> {
    let entry = match state.servable(&task) {
        Err(ApiError::NotFound(_)) => return Err(unknown(&task)),
        other => other?,
    };
    check_content_length(&request, state.config.max_body_bytes)?;
    let header_length = request
        .headers()
        .get(&INFERENCE_HEADER_CONTENT_LENGTH)
        .map(|v| v.to_str().unwrap_or("(not text)").to_string());
    let timeout_ms = state.config.request_timeout_ms;
    let model = &state.package.manifest.model;
    let (height, width) = (entry.spec.input.height, entry.spec.input.width);
    let max_images = state.config.max_client_batch_size;
    let work = async {
        let (bytes, memory) = read_body(request.into_body(), &state).await?;
        // Only now, with the body in hand, a place in the inference queue: stalled uploads never hold one.
        let _admission = state.admit()?;
        let input_name = model.input_name.clone();
        let output_name = model.output_name.clone();
        let max_values = max_images as usize * 3 * height * width;
        let worker = state.clone();
        let (parsed, images, data) = state
            .decode(memory, move |memory| -> Result<_, ApiError> {
                // The kept values (f32, and a Vec may hold twice what it uses while growing); JSON numbers past
                // the image cap are counted, not kept.
                memory
                    .grow(max_values as u64 * 8)
                    .map_err(|_| worker.memory_busy())?;
                let (json_part, binary) = split_body(&bytes, header_length.as_deref())?;
                let mut parsed = parse_request(json_part, max_values)
                    .map_err(|e| bad("bad_json", format!("invalid inference request: {e}")))?;
                let io = ModelIo {
                    input_name: &input_name,
                    output_name: &output_name,
                    height,
                    width,
                    max_images,
                };
                let (images, data) = validate(&mut parsed, binary, &io)?;
                Ok((parsed, images, data))
            })
            .await??;
        // The tensor waits for its batch: still request memory until the answer is out.
        let _tensor_memory = state.reserve(data.len() * 4)?;
        let prediction = state.predict(&entry, data, images, height, width).await?;
        Ok::<_, ApiError>((parsed, images, prediction))
    };
    let (parsed, images, prediction) = tokio::time::timeout(state.config.request_timeout(), work)
        .await
        .map_err(|_| ApiError::Timeout { timeout_ms })??;
    let binary = binary_output(&parsed);
    let logits = prediction.output.logits;
    let mut output = OutputTensor {
        name: model.output_name.clone(),
        datatype: "FP32",
        shape: vec![images, prediction.classes],
        data: None,
        parameters: None,
    };
    let mut tail = Vec::new();
    if binary {
        tail = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        output.parameters = Some(json!({"binary_data_size": tail.len()}));
    } else {
        output.data = Some(logits);
    }
    let response = InferResponse {
        model_name: task,
        model_version: prediction.version,
        id: parsed.id,
        parameters: Some(json!({
            "execution": prediction.output.path.as_str(),
            "batch_size": prediction.output.batch_images,
        })),
        outputs: vec![output],
    };
    if !binary {
        return Ok(Json(response).into_response());
    }
    let mut body = serde_json::to_vec(&response).map_err(ApiError::internal)?;
    let json_length = body.len();
    body.extend_from_slice(&tail);
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        INFERENCE_HEADER_CONTENT_LENGTH.clone(),
        HeaderValue::from(json_length),
    );
    Ok(response)
}

/// The versioned OIP paths (`/v2/models/{task}/versions/{version}/...`) answer only for the expert's current
/// version hash; any other version is an unknown model.
fn check_version(state: &AppState, task: &str, version: &str) -> Result<(), OipError> {
    let entry = state.experts.get(task).ok_or_else(|| unknown(task))?;
    if entry.version.as_deref() == Some(version) {
        Ok(())
    } else {
        Err(OipError(ApiError::NotFound(format!(
            "model `{task}` has no version `{version}`"
        ))))
    }
}

pub async fn versioned_model_metadata(
    State(state): State<AppState>,
    Path((task, version)): Path<(String, String)>,
) -> Result<Json<Value>, OipError> {
    check_version(&state, &task, &version)?;
    model_metadata(State(state), Path(task)).await
}

pub async fn versioned_model_ready(
    State(state): State<AppState>,
    Path((task, version)): Path<(String, String)>,
) -> Result<Response, OipError> {
    check_version(&state, &task, &version)?;
    model_ready(State(state), Path(task)).await
}

pub async fn versioned_infer(
    State(state): State<AppState>,
    Path((task, version)): Path<(String, String)>,
    request: Request,
) -> Result<Response, OipError> {
    check_version(&state, &task, &version)?;
    infer(State(state), Path(task), request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(request: InferRequest) -> Result<(usize, Vec<f32>), ApiError> {
        check_with(request, &[])
    }

    fn check_with(mut request: InferRequest, binary: &[u8]) -> Result<(usize, Vec<f32>), ApiError> {
        let io = ModelIo {
            input_name: "input",
            output_name: "logits",
            height: 1,
            width: 2,
            max_images: 4,
        };
        validate(&mut request, binary, &io)
    }

    fn request(shape: Vec<i64>, datatype: &str, data: Value) -> InferRequest {
        let data: Fp32Data = serde_json::from_value(data).unwrap();
        InferRequest {
            id: None,
            inputs: vec![InferInput {
                name: "input".into(),
                shape,
                datatype: datatype.into(),
                data: Some(data),
                parameters: None,
            }],
            outputs: None,
            parameters: None,
        }
    }

    fn binary_request(shape: Vec<i64>, size: u64) -> InferRequest {
        let mut request = request(shape, "FP32", json!([]));
        request.inputs[0].data = None;
        request.inputs[0].parameters = Some(TensorParameters {
            binary_data_size: Some(size),
            binary_data: None,
        });
        request
    }

    #[test]
    fn binary_tensor_data_is_read_little_endian_and_checked() {
        let values = [1.0f32, -2.5, 3.0, 4.0, 5.0, 6.0];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            check_with(binary_request(vec![1, 3, 1, 2], 24), &bytes).unwrap(),
            (1, values.to_vec())
        );
        // declared size, actual size and shape must agree
        let short = check_with(binary_request(vec![1, 3, 1, 2], 20), &bytes[..20]);
        assert_eq!(short.unwrap_err().code(), "bad_shape");
        let mismatch = check_with(binary_request(vec![1, 3, 1, 2], 24), &bytes[..20]);
        assert_eq!(mismatch.unwrap_err().code(), "bad_tensor");
        let mut nan = bytes.clone();
        nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let nan = check_with(binary_request(vec![1, 3, 1, 2], 24), &nan);
        assert_eq!(nan.unwrap_err().code(), "bad_tensor");
        let mut neither = binary_request(vec![1, 3, 1, 2], 24);
        neither.inputs[0].parameters = None;
        assert_eq!(
            check_with(neither, &bytes).unwrap_err().code(),
            "bad_tensor"
        );
        // stray binary bytes after a JSON tensor
        let json_and_tail = request(vec![1, 3, 1, 2], "FP32", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(
            check_with(json_and_tail, &bytes).unwrap_err().code(),
            "bad_tensor"
        );
        // the per-request image cap
        let many = binary_request(vec![5, 3, 1, 2], 120);
        assert_eq!(
            check_with(many, &[0; 120]).unwrap_err().code(),
            "too_many_images"
        );
    }

    #[test]
    fn body_is_split_by_the_inference_header_length() {
        assert_eq!(
            split_body(b"{}abcd", Some("2")).unwrap(),
            (&b"{}"[..], &b"abcd"[..])
        );
        assert_eq!(split_body(b"{}", None).unwrap(), (&b"{}"[..], &b""[..]));
        assert_eq!(
            split_body(b"{}", Some("3")).unwrap_err().code(),
            "bad_header"
        );
        assert_eq!(
            split_body(b"{}", Some("x")).unwrap_err().code(),
            "bad_header"
        );
    }

    #[test]
    fn data_is_read_without_a_value_tree_and_problems_are_recorded() {
        let parse = |text: &str| serde_json::from_str::<Fp32Data>(text).unwrap();
        assert_eq!(parse("[[1, 2.5], [-3e2]]").values, [1.0, 2.5, -300.0]);
        assert_eq!(parse("[1, 1e39]").problem, Some(NON_FINITE));
        for bad in [r#"[1, "NaN"]"#, "[1, null]", "[true]", r#"[{"a": [1]}]"#] {
            assert_eq!(parse(bad).problem, Some(NOT_NUMBER), "{bad}");
        }
        assert!(
            serde_json::from_str::<Fp32Data>("[1, 1e400]").is_err(),
            "out of f64 range is a JSON error"
        );
    }

    #[test]
    fn parsing_keeps_at_most_the_limit_and_counts_the_rest() {
        let text = r#"{"inputs":[{"name":"input","shape":[2,3,1,2],"datatype":"FP32","data":[1,2,3,4,5,6,7,8,9,10,11,12]}]}"#;
        let parsed = parse_request(text.as_bytes(), 6).unwrap();
        let data = parsed.inputs[0].data.as_ref().unwrap();
        assert_eq!(data.values.len(), 6);
        assert_eq!(data.dropped, 6);
        // N = 2 is within the cap, but more values were sent than the cap keeps: a shape error, never a pass
        // on the kept prefix.
        assert_eq!(check(parsed).unwrap_err().code(), "bad_shape");
        let unlimited = parse_request(text.as_bytes(), usize::MAX).unwrap();
        assert_eq!(unlimited.inputs[0].data.as_ref().unwrap().values.len(), 12);
        assert_eq!(
            value_limit(),
            usize::MAX,
            "the limit is reset after parsing"
        );
    }

    #[test]
    fn accepts_flat_and_nested_data() {
        let flat = request(vec![1, 3, 1, 2], "FP32", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(
            check(flat).unwrap(),
            (1, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
        let nested = request(
            vec![1, 3, 1, 2],
            "FP32",
            json!([[[[1, 2]], [[3, 4]], [[5, 6.5]]]]),
        );
        assert_eq!(check(nested).unwrap().1[5], 6.5);
    }

    #[test]
    fn rejects_wrong_shape_datatype_count_and_non_finite() {
        let wrong_shape = request(vec![1, 1, 1, 2], "FP32", json!([1, 2]));
        assert_eq!(check(wrong_shape).unwrap_err().code(), "bad_shape");
        let wrong_type = request(vec![1, 3, 1, 2], "INT8", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(check(wrong_type).unwrap_err().code(), "bad_datatype");
        let short = request(vec![1, 3, 1, 2], "FP32", json!([1, 2, 3]));
        assert_eq!(check(short).unwrap_err().code(), "bad_shape");
        let huge = request(vec![1, 3, 1, 2], "FP32", json!([1e300, 2, 3, 4, 5, 6]));
        assert_eq!(check(huge).unwrap_err().code(), "bad_tensor");
        let text = request(vec![1, 3, 1, 2], "FP32", json!(["NaN", 2, 3, 4, 5, 6]));
        assert_eq!(check(text).unwrap_err().code(), "bad_tensor");
        // a declared N over the per-request image cap is 413 before anything is sized from it
        let huge = request(vec![i64::MAX, 3, 1, 2], "FP32", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(check(huge).unwrap_err().code(), "too_many_images");
        let big = request(vec![1 << 40, 3, 1, 2], "FP32", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(check(big).unwrap_err().code(), "too_many_images");
        let over = request(vec![3, 3, 1, 2], "FP32", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(check(over).unwrap_err().code(), "bad_shape");
        let over = request(vec![5, 3, 1, 2], "FP32", json!(vec![0; 5 * 6]));
        assert_eq!(check(over).unwrap_err().code(), "too_many_images");
        let zero = request(vec![0, 3, 1, 2], "FP32", json!([]));
        assert_eq!(check(zero).unwrap_err().code(), "bad_shape");
    }
}
