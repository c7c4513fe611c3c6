//! KServe Open Inference Protocol v2 (REST): health, model metadata/readiness, FP32 tensor inference.

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
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

pub async fn server_metadata() -> Json<Value> {
    Json(json!({"name": "lorkd", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
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
}

#[derive(Debug, Deserialize)]
pub struct InferInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    pub data: Fp32Data,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
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

/// Checks an inference request against the model and returns `(images, data)` (the data is moved out).
pub fn validate(
    request: &mut InferRequest,
    input_name: &str,
    output_name: &str,
    height: usize,
    width: usize,
    max_images: u32,
) -> Result<(usize, Vec<f32>), ApiError> {
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
    if images > max_images as usize {
        return Err(ApiError::TooManyImages {
            images,
            limit: max_images,
        });
    }
    let needed = images.checked_mul(3 * height * width);
    if let Some(problem) = input.data.problem {
        return Err(bad("bad_tensor", problem));
    }
    let held = input.data.values.len() + input.data.dropped;
    if needed != Some(held) {
        return Err(bad(
            "bad_shape",
            format!(
                "input holds {held} values; shape {:?} needs N x 3 x {height} x {width}",
                input.shape
            ),
        ));
    }
    let data = std::mem::take(&mut input.data.values);
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

/// `POST /v2/models/{task}/infer`
pub async fn infer(
    State(state): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Json<InferResponse>, OipError> {
    let entry = match state.servable(&task) {
        Err(ApiError::NotFound(_)) => return Err(unknown(&task)),
        other => other?,
    };
    check_content_length(&request, state.config.max_body_bytes)?;
    let timeout_ms = state.config.request_timeout_ms;
    let model = &state.package.manifest.model;
    let (height, width) = (entry.spec.input.height, entry.spec.input.width);
    let work = async {
        let (bytes, memory) = read_body(request.into_body(), &state).await?;
        // Only now, with the body in hand, a place in the inference queue: stalled uploads never hold one.
        let _admission = state.admit()?;
        let max_values = state.config.max_client_batch_size as usize * 3 * height * width;
        let worker = state.clone();
        let mut parsed: InferRequest = state
            .decode(memory, move |memory| {
                // The kept values (f32, and a Vec may hold twice what it uses while growing).
                memory
                    .grow(max_values as u64 * 8)
                    .map_err(|_| worker.memory_busy())?;
                parse_request(&bytes, max_values)
                    .map_err(|e| bad("bad_json", format!("invalid inference request: {e}")))
            })
            .await??;
        let (images, data) = validate(
            &mut parsed,
            &model.input_name,
            &model.output_name,
            height,
            width,
            state.config.max_client_batch_size,
        )?;
        // The tensor waits for its batch: still request memory until the answer is out.
        let _tensor_memory = state.reserve(data.len() * 4)?;
        let prediction = state.predict(&entry, data, images, height, width).await?;
        Ok::<_, ApiError>((parsed.id, images, prediction))
    };
    let (id, images, prediction) = tokio::time::timeout(state.config.request_timeout(), work)
        .await
        .map_err(|_| ApiError::Timeout { timeout_ms })??;
    Ok(Json(InferResponse {
        model_name: task,
        model_version: prediction.version,
        id,
        outputs: vec![OutputTensor {
            name: model.output_name.clone(),
            datatype: "FP32",
            shape: vec![images, prediction.classes],
            data: prediction.output.logits,
        }],
    }))
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
) -> Result<Json<InferResponse>, OipError> {
    check_version(&state, &task, &version)?;
    infer(State(state), Path(task), request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mut request: InferRequest) -> Result<(usize, Vec<f32>), ApiError> {
        validate(&mut request, "input", "logits", 1, 2, 64)
    }

    fn request(shape: Vec<i64>, datatype: &str, data: Value) -> InferRequest {
        let data: Fp32Data = serde_json::from_value(data).unwrap();
        InferRequest {
            id: None,
            inputs: vec![InferInput {
                name: "input".into(),
                shape,
                datatype: datatype.into(),
                data,
            }],
            outputs: None,
        }
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
        let mut parsed = parse_request(text.as_bytes(), 6).unwrap();
        assert_eq!(parsed.inputs[0].data.values.len(), 6);
        assert_eq!(parsed.inputs[0].data.dropped, 6);
        // the shape is within the image cap and the count matches: the dropped values mean the cap was set wrong
        // for this shape, which the handler never does (cap = max images x image size); here it is a shape error.
        assert_eq!(
            validate(&mut parsed, "input", "logits", 1, 2, 1)
                .unwrap_err()
                .code(),
            "too_many_images"
        );
        let unlimited = parse_request(text.as_bytes(), usize::MAX).unwrap();
        assert_eq!(unlimited.inputs[0].data.values.len(), 12);
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
        let huge = request(vec![i64::MAX, 3, 1, 2], "FP32", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(check(huge).unwrap_err().code(), "too_many_images");
        let big = request(vec![1 << 40, 3, 1, 2], "FP32", json!([1, 2, 3, 4, 5, 6]));
        assert_eq!(check(big).unwrap_err().code(), "too_many_images");
        let over = request(vec![65, 3, 1, 2], "FP32", json!(vec![0; 65 * 6]));
        assert_eq!(check(over).unwrap_err().code(), "too_many_images");
        let zero = request(vec![0, 3, 1, 2], "FP32", json!([]));
        assert_eq!(check(zero).unwrap_err().code(), "bad_shape");
    }
}
