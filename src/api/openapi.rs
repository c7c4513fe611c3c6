//! The OpenAPI 3.1 document, generated from [`super::ROUTES`] plus hand-written component schemas.

use serde_json::{json, Map, Value};

use super::{is_open, Api, ROUTES};

fn schema_ref(name: &str) -> Value {
    match name {
        "binary" => json!({"type": "string", "format": "binary"}),
        "text" => json!({"type": "string"}),
        "object" => json!({"type": "object"}),
        other => json!({"$ref": format!("#/components/schemas/{other}")}),
    }
}

fn path_parameters(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| match name {
            "version" => json!({"name": name, "in": "path", "required": true, "description": "Expert version hash (16 hex chars)", "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"}}),
            _ => json!({"name": name, "in": "path", "required": true, "description": "Task id (= OIP model name)", "schema": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,63}$"}}),
        })
        .collect()
}

/// The whole document (deterministic: same routes, same bytes).
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let mut operation = Map::new();
        operation.insert("operationId".into(), json!(route.operation_id));
        operation.insert("summary".into(), json!(route.summary));
        let tag = match route.api {
            Api::Native => "native",
            Api::Oip => "open-inference-protocol-v2",
            Api::Ops => "operations",
            Api::Admin => "admin",
        };
        operation.insert("tags".into(), json!([tag]));
        let mut parameters = path_parameters(route.path);
        parameters.extend(route.query.iter().map(|q| json!({"name": q.name, "in": "query", "required": false, "description": q.description, "schema": {"type": q.schema}})));
        if !parameters.is_empty() {
            operation.insert("parameters".into(), Value::Array(parameters));
        }
        if !route.request.is_empty() {
            let content: Map<String, Value> = route
                .request
                .iter()
                .map(|(media, schema)| (media.to_string(), json!({"schema": schema_ref(schema)})))
                .collect();
            operation.insert(
                "requestBody".into(),
                json!({"required": true, "content": content}),
            );
        }
        let error_schema = match route.api {
            Api::Oip => "OipError",
            _ => "Error",
        };
        let mut extra: Vec<(u16, &str, &str)> = Vec::new();
        if !is_open(route.operation_id) {
            operation.insert("security".into(), json!([{"bearer": []}]));
            extra.push((
                401,
                "Missing or unknown API key (when LORKD_API_KEYS / LORKD_API_KEYS_FILE are set)",
                error_schema,
            ));
        }
        if !route.request.is_empty() {
            extra.push((
                408,
                "Body not received within LORKD_BODY_TIMEOUT_MS",
                error_schema,
            ));
        }
        let mut responses = Map::new();
        for (status, description, schema) in route.responses.iter().copied().chain(extra) {
            let media = if schema == "text" {
                "text/plain"
            } else {
                "application/json"
            };
            let mut response = json!({"description": description, "content": {media: {"schema": schema_ref(schema)}}});
            if status == 429 || (status == 503 && !route.request.is_empty()) {
                response["headers"] = json!({"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}});
            }
            responses.insert(status.to_string(), response);
        }
        operation.insert("responses".into(), Value::Object(responses));
        let item = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        item[route.method.to_ascii_lowercase()] = Value::Object(operation);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "lorkd",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Serves LoRKD task experts: each expert is the shared student with W0 + scale * B_t A_t and its own head, assembled on demand and cached. Native JSON API under /v1, KServe Open Inference Protocol v2 under /v2."
        },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from LORKD_API_KEYS / LORKD_API_KEYS_FILE. Health probes and this document need none."},
                "adminBearer": {"type": "http", "scheme": "bearer", "description": "An admin key from LORKD_ADMIN_KEYS / LORKD_ADMIN_KEYS_FILE (the admin API is off without one)."}
            },
        },
    })
}

fn schemas() -> Value {
    json!({
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string", "examples": ["bad_image", "bad_frame", "not_found", "payload_too_large", "too_many_images", "unsupported_media_type", "image_too_large", "not_an_image", "overloaded", "memory_busy", "body_timeout", "unauthorized", "forbidden", "invalid_expert", "conflict", "timeout", "internal"]},
                "message": {"type": "string"}}}}
        },
        "OipError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "ExpertUpload": {"type": "object", "required": ["spec", "expert"], "properties": {
            "spec": {"type": "string", "contentMediaType": "application/json", "description": "JSON task spec as in manifest.json tasks[], without `id` (the path's) and `file`: name, modality, labels, num_classes, input {channels, height, width, mean, std}, metrics"},
            "expert": {"type": "string", "format": "binary", "description": "the task's factors and head (safetensors, models/FORMAT.md)"}}},
        "ExpertRemoved": {"type": "object", "properties": {"removed": {"type": "string"}, "version": {"type": ["string", "null"]}, "persisted": {"type": "boolean"}}},
        "ReloadResult": {"type": "object", "properties": {"experts": {"type": "integer"}, "added": {"type": "array", "items": {"type": "string"}}, "changed": {"type": "array", "items": {"type": "string"}}, "removed": {"type": "array", "items": {"type": "string"}}}},
        "MultipartImage": {"type": "object", "required": ["image"], "description": "One or more `image` parts (PNG, JPEG or DICOM each, recognised by its bytes), answered in order; other fields are ignored", "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}}},
        "InputInfo": {"type": "object", "description": "What was used of one image (never a DICOM patient or study attribute)", "properties": {
            "format": {"type": "string", "enum": ["png", "jpeg", "dicom"]}, "rows": {"type": "integer"}, "columns": {"type": "integer"},
            "bits_stored": {"type": "integer"}, "photometric_interpretation": {"type": "string"},
            "transfer_syntax": {"type": "string", "description": "DICOM only: name (UID)"},
            "frame": {"type": "integer", "description": "0-based frame used"}, "frames": {"type": "integer"},
            "window": {"type": ["object", "null"], "description": "null for 8-bit and colour images (used as they are)", "properties": {
                "center": {"type": "number"}, "width": {"type": "number"}, "function": {"type": "string", "enum": ["LINEAR", "LINEAR_EXACT", "SIGMOID"]},
                "source": {"type": "string", "enum": ["query", "file", "file-lut", "min-max", "stored-range"], "description": "file-lut: the file's VOI LUT Sequence (no center/width)"}}},
            "pixels_png": {"type": "string", "description": "with return_pixels=true: base64 PNG of the 8-bit image before channel conversion, resize and normalisation"}}},
        "ImageResult": {"type": "object", "properties": {
            "predictions": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"}, "label": {"type": "string"}, "probability": {"type": "number"}}}},
            "logits": {"type": "array", "items": {"type": "number"}}, "input": {"$ref": "#/components/schemas/InputInfo"}}},
        "TaskInput": {"type": "object", "properties": {
            "channels": {"type": "integer", "enum": [1, 3], "description": "1: grey task (BT.601 luma replicated to 3 channels)"},
            "height": {"type": "integer"}, "width": {"type": "integer"},
            "mean": {"type": "array", "items": {"type": "number"}}, "std": {"type": "array", "items": {"type": "number"}}}},
        "CacheState": {"type": "object", "properties": {
            "state": {"type": "string", "enum": ["resident", "assembling", "cold"]}, "pinned": {"type": "boolean"},
            "bytes": {"type": ["integer", "null"]}, "hits": {"type": "integer"}}},
        "Expert": {"type": "object", "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "modality": {"type": "string"},
            "labels": {"type": "array", "items": {"type": "string"}}, "num_classes": {"type": "integer"},
            "input": {"$ref": "#/components/schemas/TaskInput"},
            "version": {"type": ["string", "null"], "description": "16 hex chars of sha256(sha256(student.onnx):sha256(expert file))"},
            "status": {"type": "string", "enum": ["available", "disabled"]}, "disabled_reason": {"type": ["string", "null"]},
            "rank": {"type": "integer"}, "alpha": {"type": "number"}, "scale": {"type": "number"},
            "parameters": {"type": "object", "properties": {"shared": {"type": ["integer", "null"]}, "delta": {"type": ["integer", "null"]}, "head": {"type": "integer"}}},
            "metrics": {"type": "object"}, "cache": {"$ref": "#/components/schemas/CacheState"}}},
        "ExpertList": {"type": "object", "properties": {"package": {"type": "string"}, "experts": {"type": "array", "items": {"$ref": "#/components/schemas/Expert"}}}},
        "Prediction": {"type": "object", "properties": {
            "task": {"type": "string"}, "expert_version": {"type": "string"},
            "predictions": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"}, "label": {"type": "string"}, "probability": {"type": "number"}}}},
            "logits": {"type": "array", "items": {"type": "number"}},
            "input": {"$ref": "#/components/schemas/InputInfo"},
            "results": {"type": "array", "description": "several images: one result per image in request order (then no top-level predictions/logits/input)", "items": {"$ref": "#/components/schemas/ImageResult"}},
            "cache": {"type": "string", "enum": ["hit", "miss"]}, "batch_size": {"type": "integer"},
            "session": {"type": "string", "enum": ["shared", "dedicated", "mixed"], "description": "shared: weights fed to the one shared session; dedicated: promoted expert with its own session; mixed: the mixed-task graph's session"},
            "execution": {"type": "string", "enum": ["merged", "mixed"], "description": "merged: this expert's assembled weights; mixed: each image with its own expert's factors, many experts in one run (LORKD_EXECUTION)"},
            "timings": {"type": "object", "properties": {"decode_ms": {"type": "number"}, "expert_ms": {"type": "number"}, "queue_ms": {"type": "number"}, "inference_ms": {"type": "number"}, "total_ms": {"type": "number"}}}}},
        "Info": {"type": "object", "properties": {"service": {"type": "object"}, "package": {"type": "object"}, "runtime": {"type": "object", "properties": {"provider": {"type": "string", "enum": ["cpu", "cuda"]}}}, "cache": {"type": "object"}, "config": {"type": "object"}}},
        "OipServerMetadata": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "extensions": {"type": "array", "items": {"type": "string"}}}},
        "OipLive": {"type": "object", "properties": {"live": {"type": "boolean"}}},
        "OipReady": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        "OipModelReady": {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
        "OipTensorMetadata": {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}}}},
        "OipModelMetadata": {"type": "object", "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}}, "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/OipTensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/OipTensorMetadata"}}}},
        "OipInferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
                "name": {"type": "string", "const": "input"}, "shape": {"type": "array", "items": {"type": "integer"}, "description": "[N, 3, H, W], N <= LORKD_MAX_CLIENT_BATCH_SIZE"},
                "datatype": {"type": "string", "const": "FP32"}, "data": {"type": "array", "items": {"type": "number"}, "description": "row-major values (nested arrays are accepted too); preprocessed per FORMAT.md section 4 (absent with binary_data_size)"},
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "description": "binary tensor extension: bytes of this tensor after the JSON header"}}}}}},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string", "const": "logits"},
                "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean", "description": "answer this output in binary"}}}}}},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean", "description": "every output in binary (tritonclient's default when no outputs are named)"}}}}},
        "OipBinaryInferRequest": {"type": "string", "format": "binary", "description": "Binary tensor extension: the JSON request (OipInferRequest) of `Inference-Header-Content-Length` bytes, then each input with `binary_data_size` as little-endian FP32, in input order"},
        "OipInferResponse": {"type": "object", "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"type": "object", "description": "how the request ran", "properties": {"execution": {"type": "string", "enum": ["merged", "mixed"]}, "batch_size": {"type": "integer"}}},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}}, "data": {"type": "array", "items": {"type": "number"}},
                "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}}}}}}}
    })
}
