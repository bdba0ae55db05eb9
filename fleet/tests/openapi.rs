#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design
//! Keeps docs/openapi.json honest: its paths are the protocol's path constants, its schemas have exactly the
//! fields the Rust wire types serialize (a field added in Rust without the document fails here), every example
//! in it validates against its schema, and every `$ref` resolves.
//!
//! The schema check is a small validator for the subset of JSON Schema the document uses; a keyword it does
//! not know fails the test rather than being skipped.

use cairn_proto::fleet::{
    ActivateRequest, AttestRequest, CertifiedKey, Challenge, Credential, EnrollRequest,
    EnrollResponse, Evidence, FleetError, FleetInfo, Hex, PcrValue, Verdict, ACTIVATE_PATH,
    ATTEST_PATH, CHALLENGE_PATH, ENROLL_PATH, FLEET_PROTOCOL_VERSION, INFO_PATH,
};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

const HEX_PATTERN: &str = "^([0-9a-f]{2})*$";
const SCHEMAS: &str = "#/components/schemas/";
const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];
/// The security scheme the mTLS routes name.
const MTLS_SCHEME: &str = "deviceCertificate";

fn doc() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("$ref {reference:?} is not a local reference"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("$ref {reference:?} does not resolve"))
}

/// One route as the Rust side defines it: path constant, method, whether it needs the client certificate,
/// the request schema (None: no body is read) and the 200 schema.
struct Route {
    path: &'static str,
    method: &'static str,
    mtls: bool,
    request: Option<&'static str>,
    response: &'static str,
}

fn routes() -> Vec<Route> {
    let r = |path, method, mtls, request, response| Route {
        path,
        method,
        mtls,
        request,
        response,
    };
    vec![
        r(INFO_PATH, "get", false, None, "FleetInfo"),
        r(
            ENROLL_PATH,
            "post",
            false,
            Some("EnrollRequest"),
            "EnrollResponse",
        ),
        r(
            ACTIVATE_PATH,
            "post",
            false,
            Some("ActivateRequest"),
            "Verdict",
        ),
        r(CHALLENGE_PATH, "post", true, None, "Challenge"),
        r(ATTEST_PATH, "post", true, Some("AttestRequest"), "Verdict"),
    ]
}

/// The values of every `pub const …_PATH: &str` in proto/src/fleet.rs, read from the source so that a new
/// path constant fails this test until the routes above (and the document) have it.
fn path_constants_in_source() -> BTreeSet<String> {
    let source = include_str!("../../proto/src/fleet.rs");
    source
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (name, value) = rest.split_once(':')?;
            if !name.ends_with("_PATH") {
                return None;
            }
            let value = value.split_once('"')?.1.split_once('"')?.0;
            Some(value.to_owned())
        })
        .collect()
}

#[test]
fn paths_and_methods_are_the_protocol_constants() {
    let doc = doc();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "not OpenAPI 3.1"
    );
    let routes = routes();
    let ours: BTreeSet<String> = routes.iter().map(|r| r.path.to_owned()).collect();
    assert_eq!(
        path_constants_in_source(),
        ours,
        "the *_PATH constants in proto/src/fleet.rs and this test's routes differ"
    );
    for path in &ours {
        assert!(
            path.starts_with(&format!("/v{FLEET_PROTOCOL_VERSION}/")),
            "{path}"
        );
    }
    let paths = doc["paths"].as_object().expect("paths");
    let documented: BTreeSet<String> = paths.keys().cloned().collect();
    assert_eq!(documented, ours, "docs/openapi.json paths");

    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("components.securitySchemes");
    assert_eq!(schemes[MTLS_SCHEME]["type"], "mutualTLS");
    assert!(
        doc.get("security").is_none(),
        "top-level security would apply to enrolment too"
    );

    for route in &routes {
        let item = paths[route.path].as_object().unwrap();
        let methods: BTreeSet<&str> = item
            .keys()
            .map(String::as_str)
            .filter(|k| HTTP_METHODS.contains(k))
            .collect();
        assert_eq!(methods, BTreeSet::from([route.method]), "{}", route.path);
        let op = &item[route.method];
        let what = format!("{} {}", route.method, route.path);

        let security = op.get("security").cloned().unwrap_or(json!([]));
        let expected = if route.mtls {
            json!([{ MTLS_SCHEME: [] }])
        } else {
            json!([])
        };
        assert_eq!(security, expected, "{what}: security");

        match route.request {
            Some(schema) => {
                assert_eq!(op["requestBody"]["required"], true, "{what}");
                assert_eq!(
                    op["requestBody"]["content"]["application/json"]["schema"]["$ref"],
                    format!("{SCHEMAS}{schema}"),
                    "{what}: request schema"
                );
            }
            None => {
                if let Some(body) = op.get("requestBody") {
                    assert_eq!(body["required"], false, "{what}: the fleet reads no body");
                }
            }
        }

        let responses = op["responses"].as_object().expect("responses");
        assert_eq!(
            responses["200"]["content"]["application/json"]["schema"]["$ref"],
            format!("{SCHEMAS}{}", route.response),
            "{what}: 200 schema"
        );
        for (status, resp) in responses {
            assert!(
                status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()),
                "{what}: status {status:?}"
            );
            if status != "200" {
                assert_eq!(
                    resp["content"]["application/json"]["schema"]["$ref"],
                    format!("{SCHEMAS}FleetError"),
                    "{what} {status}: every error answer is a FleetError"
                );
            }
            if route.mtls {
                continue;
            }
            assert!(
                status != "401" && status != "403",
                "{what}: the fleet never checks a client certificate here"
            );
        }
        if route.mtls {
            for status in ["401", "403"] {
                assert!(responses.contains_key(status), "{what}: {status} missing");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Examples built from the real types

fn hex(bytes: &[u8]) -> Hex {
    Hex(bytes.to_vec())
}

fn evidence(event_log: Option<Hex>) -> Evidence {
    Evidence {
        quote: hex(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x18]),
        signature: hex(&[0x00, 0x14, 0x00, 0x0b, 0x01, 0x00]),
        pcrs: vec![
            PcrValue {
                index: 0,
                sha256: Hex(vec![0x3d; 32]),
            },
            PcrValue {
                index: 7,
                sha256: Hex(vec![0xa8; 32]),
            },
        ],
        event_log,
    }
}

fn certified_key() -> CertifiedKey {
    CertifiedKey {
        public: hex(&[0x00, 0x58, 0x00, 0x23]),
        certify_info: hex(&[0xff, 0x54, 0x43, 0x47, 0x80, 0x17]),
        signature: hex(&[0x00, 0x14, 0x00, 0x0b]),
    }
}

fn challenge(credential: Option<Credential>) -> Challenge {
    Challenge {
        id: "4be2a9107fd35c6e81b0c2d4e6f80a1c".into(),
        nonce: Hex(vec![0x9c; 32]),
        expires_in_secs: 60,
        credential,
    }
}

fn credential() -> Credential {
    Credential {
        id_object: hex(&[0x00, 0x20, 0x4f]),
        encrypted_secret: hex(&[0x7a, 0x13]),
    }
}

const DEVICE: &str = "000b5f2c1e9a0d4b7c3e8f6a2b1d9c0e4f7a8b6c5d3e2f1a0b9c8d7e6f5a4b3c2d1e";

fn enroll_request(ek_certificate: Option<Hex>) -> EnrollRequest {
    EnrollRequest {
        ek_algorithm: "ecc-p256".into(),
        ek_public: hex(&[0x00, 0x7a, 0x00, 0x23]),
        ek_certificate,
        ak_public: hex(&[0x01, 0x18, 0x00, 0x01]),
        hostname: "rack3-node07".into(),
        agent_version: "0.1.0".into(),
    }
}

/// Every variant of the tagged enums, with its tag. The matches are exhaustive on purpose: a new variant does
/// not compile until it has an example here.
fn enroll_responses() -> Vec<EnrollResponse> {
    let all = vec![
        EnrollResponse::Challenge {
            device_id: DEVICE.into(),
            challenge: challenge(Some(credential())),
        },
        EnrollResponse::Pending {
            device_id: DEVICE.into(),
            message: "an operator must approve".into(),
            retry_after_secs: 60,
        },
        EnrollResponse::Refused {
            device_id: DEVICE.into(),
            code: "ak_attributes".into(),
            message: "the attestation key lacks the restricted attribute".into(),
            retry_after_secs: 60,
        },
    ];
    let tags: BTreeSet<&str> = all
        .iter()
        .map(|v| match v {
            EnrollResponse::Challenge { .. } => "challenge",
            EnrollResponse::Pending { .. } => "pending",
            EnrollResponse::Refused { .. } => "refused",
        })
        .collect();
    assert_eq!(tags.len(), 3, "one example per EnrollResponse variant");
    all
}

fn verdicts() -> Vec<Verdict> {
    let all = vec![
        Verdict::Trusted {
            device_id: DEVICE.into(),
            certificate_pem: Some("-----BEGIN CERTIFICATE-----\n…".into()),
            reattest_after_secs: 3600,
        },
        Verdict::Trusted {
            device_id: DEVICE.into(),
            certificate_pem: None,
            reattest_after_secs: 3600,
        },
        Verdict::Refused {
            device_id: DEVICE.into(),
            code: "pcr_changed".into(),
            message: "PCRs [4] differ".into(),
            retry_after_secs: 60,
        },
    ];
    let tags: BTreeSet<&str> = all
        .iter()
        .map(|v| match v {
            Verdict::Trusted { .. } => "trusted",
            Verdict::Refused { .. } => "refused",
        })
        .collect();
    assert_eq!(tags.len(), 2, "one example per Verdict variant");
    all
}

/// (schema name, serialized value) for every wire type, with each Option both Some and None, so that the
/// schemas' `required` lists can be checked: exactly the fields that are never null.
fn examples() -> Vec<(&'static str, Value)> {
    let mut out: Vec<(&'static str, Value)> = vec![
        ("Hex", v(&hex(&[0xab, 0x01]))),
        ("Hex", v(&Hex(Vec::new()))),
        (
            "FleetInfo",
            v(&FleetInfo {
                name: "cairn-fleet".into(),
                version: "0.1.0".into(),
                protocol_versions: vec![FLEET_PROTOCOL_VERSION],
            }),
        ),
        (
            "FleetError",
            v(&FleetError {
                code: "malformed".into(),
                message: "the request body is not valid".into(),
            }),
        ),
        (
            "EnrollRequest",
            v(&enroll_request(Some(hex(&[0x30, 0x82])))),
        ),
        ("EnrollRequest", v(&enroll_request(None))),
        ("Challenge", v(&challenge(Some(credential())))),
        ("Challenge", v(&challenge(None))),
        ("Credential", v(&credential())),
        ("Evidence", v(&evidence(Some(hex(&[0, 0, 0, 0, 3]))))),
        ("Evidence", v(&evidence(None))),
        (
            "PcrValue",
            v(&PcrValue {
                index: 23,
                sha256: Hex(vec![0; 32]),
            }),
        ),
        ("CertifiedKey", v(&certified_key())),
        (
            "ActivateRequest",
            v(&ActivateRequest {
                device_id: DEVICE.into(),
                challenge_id: "4be2a9107fd35c6e81b0c2d4e6f80a1c".into(),
                activated_credential: Hex(vec![0x6a; 32]),
                evidence: evidence(Some(hex(&[0]))),
                device_key: certified_key(),
                telemetry_key: certified_key(),
            }),
        ),
        (
            "AttestRequest",
            v(&AttestRequest {
                challenge_id: "4be2a9107fd35c6e81b0c2d4e6f80a1c".into(),
                evidence: evidence(None),
            }),
        ),
    ];
    out.extend(enroll_responses().iter().map(|r| ("EnrollResponse", v(r))));
    out.extend(verdicts().iter().map(|r| ("Verdict", v(r))));
    out
}

fn v<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).expect("wire types serialize")
}

// ---------------------------------------------------------------------------------------------------------
// A validator for the JSON Schema subset the document uses

const KEYWORDS: [&str; 17] = [
    "$ref",
    "description",
    "title",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "oneOf",
    "discriminator",
    "const",
    "enum",
    "minimum",
    "maximum",
    "pattern",
    "examples",
    "format",
];

/// What validating Rust examples tells about the document: the component schemas reached, and per object
/// schema the properties seen null and not null.
#[derive(Default)]
struct Seen {
    schemas: BTreeSet<String>,
    /// schema pointer → (property → ever null, ever non-null)
    nullness: BTreeMap<String, BTreeMap<String, (bool, bool)>>,
}

struct Validator<'a> {
    doc: &'a Value,
    /// Rust examples: an object must have exactly the schema's properties (serde always writes every field).
    exact: bool,
    seen: Seen,
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_hex(s: &str) -> bool {
    s.len().is_multiple_of(2) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl<'a> Validator<'a> {
    fn new(doc: &'a Value, exact: bool) -> Self {
        Validator {
            doc,
            exact,
            seen: Seen::default(),
        }
    }

    /// Validates `value` against the schema at `pointer` (a `$ref` string), recording what it saw.
    fn check_ref(&mut self, reference: &str, value: &Value, at: &str) -> Result<(), String> {
        if let Some(name) = reference.strip_prefix(SCHEMAS) {
            self.seen.schemas.insert(name.to_owned());
        }
        let schema = resolve(self.doc, reference);
        self.check(schema, reference, value, at)
    }

    fn check(&mut self, schema: &Value, here: &str, value: &Value, at: &str) -> Result<(), String> {
        let s = schema
            .as_object()
            .unwrap_or_else(|| panic!("{here}: a schema must be an object"));
        for k in s.keys() {
            assert!(
                KEYWORDS.contains(&k.as_str()),
                "{here}: keyword {k:?} is not understood by fleet/tests/openapi.rs"
            );
        }
        if let Some(r) = s.get("$ref") {
            return self.check_ref(r.as_str().expect("$ref is a string"), value, at);
        }
        if let Some(alternatives) = s.get("oneOf") {
            let alternatives = alternatives.as_array().expect("oneOf is an array");
            if let Some(d) = s.get("discriminator") {
                let prop = d["propertyName"]
                    .as_str()
                    .expect("discriminator.propertyName");
                let mapping = d["mapping"].as_object().expect("discriminator.mapping");
                let mapped: BTreeSet<&str> =
                    mapping.values().map(|v| v.as_str().unwrap()).collect();
                let listed: BTreeSet<&str> = alternatives
                    .iter()
                    .map(|a| a["$ref"].as_str().expect("discriminated oneOf lists $refs"))
                    .collect();
                assert_eq!(
                    mapped, listed,
                    "{here}: discriminator mapping and oneOf differ"
                );
                let tag = value
                    .get(prop)
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("{at}: no {prop:?} tag"))?;
                let target = mapping
                    .get(tag)
                    .ok_or_else(|| format!("{at}: tag {tag:?} is not in {here}'s mapping"))?;
                return self.check_ref(target.as_str().unwrap(), value, at);
            }
            let mut matched = 0;
            let mut errors = Vec::new();
            for (i, alt) in alternatives.iter().enumerate() {
                match self.check(alt, &format!("{here}/oneOf/{i}"), value, at) {
                    Ok(()) => matched += 1,
                    Err(e) => errors.push(e),
                }
            }
            return match matched {
                1 => Ok(()),
                0 => Err(format!("{at}: matches no oneOf alternative: {errors:?}")),
                n => Err(format!("{at}: matches {n} oneOf alternatives")),
            };
        }
        if let Some(t) = s.get("type") {
            let allowed: Vec<&str> = match t {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
                _ => panic!("{here}: type must be a string or an array"),
            };
            let actual = json_type(value);
            let integer_as_number = actual == "integer" && allowed.contains(&"number");
            if !allowed.contains(&actual) && !integer_as_number {
                return Err(format!("{at}: {actual}, schema {here} allows {allowed:?}"));
            }
        }
        if let Some(c) = s.get("const") {
            if c != value {
                return Err(format!("{at}: {value} is not {c}"));
            }
        }
        if let Some(e) = s.get("enum") {
            if !e.as_array().unwrap().contains(value) {
                return Err(format!("{at}: {value} is not one of {e}"));
            }
        }
        if let Some(n) = value.as_u64() {
            if let Some(min) = s.get("minimum") {
                assert!(min.as_u64().is_some(), "{here}: minimum");
                if n < min.as_u64().unwrap() {
                    return Err(format!("{at}: {n} < {min}"));
                }
            }
            if let Some(max) = s.get("maximum") {
                if n > max.as_u64().expect("maximum") {
                    return Err(format!("{at}: {n} > {max}"));
                }
            }
        }
        if let (Some(p), Some(text)) = (s.get("pattern"), value.as_str()) {
            assert_eq!(p, HEX_PATTERN, "{here}: the only pattern the document uses");
            if !is_hex(text) {
                return Err(format!("{at}: {text:?} is not lowercase hex bytes"));
            }
        }
        if let (Some(items), Some(array)) = (s.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                self.check(items, &format!("{here}/items"), item, &format!("{at}[{i}]"))?;
            }
        }
        if let Some(props) = s.get("properties") {
            let props = props.as_object().expect("properties");
            assert_eq!(
                s.get("additionalProperties"),
                Some(&Value::Bool(false)),
                "{here}: the wire types deny unknown fields"
            );
            let Some(object) = value.as_object() else {
                return Ok(()); // the type check above has ruled on non-objects
            };
            let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
            let listed: BTreeSet<&str> = props.keys().map(String::as_str).collect();
            if self.exact && keys != listed {
                return Err(format!(
                    "{at}: the Rust type serializes {keys:?}, schema {here} lists {listed:?}"
                ));
            }
            if let Some(extra) = keys.difference(&listed).next() {
                return Err(format!("{at}: {extra:?} is not a property of {here}"));
            }
            for r in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let r = r.as_str().unwrap();
                assert!(
                    listed.contains(r),
                    "{here}: required {r:?} is not a property"
                );
                if !keys.contains(r) {
                    return Err(format!("{at}: required {r:?} is missing"));
                }
            }
            for (k, v) in object {
                let entry = self
                    .seen
                    .nullness
                    .entry(here.to_owned())
                    .or_default()
                    .entry(k.clone())
                    .or_default();
                if v.is_null() {
                    entry.0 = true;
                } else {
                    entry.1 = true;
                }
                self.check(
                    &props[k],
                    &format!("{here}/properties/{k}"),
                    v,
                    &format!("{at}.{k}"),
                )?;
            }
        }
        Ok(())
    }
}

#[test]
fn schemas_have_exactly_the_fields_of_the_rust_types() {
    let doc = doc();
    let mut v = Validator::new(&doc, true);
    for (name, value) in examples() {
        v.check_ref(&format!("{SCHEMAS}{name}"), &value, name)
            .unwrap_or_else(|e| panic!("{e}\n  example: {value}"));
    }

    // Every component schema describes a Rust type an example reached.
    let components: BTreeSet<String> = doc["components"]["schemas"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let unreached: Vec<&String> = components.difference(&v.seen.schemas).collect();
    assert!(
        unreached.is_empty(),
        "schemas no Rust example reaches: {unreached:?}"
    );

    // `required` is exactly the fields that are never null (Option fields are null in some example), and
    // Option fields accept null.
    for (schema, props) in &v.seen.nullness {
        let required: BTreeSet<&str> = resolve(&doc, schema)["required"]
            .as_array()
            .map(|r| r.iter().map(|x| x.as_str().unwrap()).collect())
            .unwrap_or_default();
        for (prop, (null, non_null)) in props {
            assert!(*non_null, "{schema}: no example has a value for {prop:?}");
            assert_eq!(
                required.contains(prop.as_str()),
                !null,
                "{schema}: {prop:?} is {} in Rust",
                if *null { "an Option" } else { "always present" }
            );
        }
    }
    assert_eq!(
        doc["components"]["schemas"]["Hex"],
        json!({
            "type": "string",
            "pattern": HEX_PATTERN,
            "description": doc["components"]["schemas"]["Hex"]["description"],
        })
    );
}

/// Every object in the document that has an `examples` map of `{value}` objects next to a `schema`.
fn media_examples(v: &Value, at: String, out: &mut Vec<(String, Value, Value)>) {
    match v {
        Value::Object(map) => {
            if let (Some(schema), Some(Value::Object(examples))) =
                (map.get("schema"), map.get("examples"))
            {
                for (name, example) in examples {
                    let value = example.get("value").cloned().expect("example.value");
                    out.push((format!("{at}/examples/{name}"), schema.clone(), value));
                }
            }
            for (k, child) in map {
                media_examples(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                media_examples(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_documents_own_examples_validate() {
    let doc = doc();
    let mut found = Vec::new();
    media_examples(&doc["paths"], "#/paths".into(), &mut found);
    assert!(found.len() >= 12, "only {} examples found", found.len());
    for (at, schema, value) in found {
        let mut v = Validator::new(&doc, false);
        v.check(&schema, &at, &value, &at)
            .unwrap_or_else(|e| panic!("{e}\n  example: {value}"));
        // And each one is what the Rust types read and write.
        roundtrip(&schema, &value, &at);
    }
}

/// Parses a documented example as the Rust type its schema names and serializes it again: the example must
/// be something the real types accept, and (Option fields aside, which cairn writes as null) look the same.
fn roundtrip(schema: &Value, value: &Value, at: &str) {
    fn again<T: serde::Serialize + serde::de::DeserializeOwned>(value: &Value, at: &str) -> Value {
        let parsed: T = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("{at}: the Rust type refuses the example: {e}"));
        serde_json::to_value(parsed).unwrap()
    }
    let Some(name) = schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix(SCHEMAS))
    else {
        return;
    };
    let back = match name {
        "FleetInfo" => again::<FleetInfo>(value, at),
        "FleetError" => again::<FleetError>(value, at),
        "EnrollRequest" => again::<EnrollRequest>(value, at),
        "EnrollResponse" => again::<EnrollResponse>(value, at),
        "ActivateRequest" => again::<ActivateRequest>(value, at),
        "AttestRequest" => again::<AttestRequest>(value, at),
        "Challenge" => again::<Challenge>(value, at),
        "Verdict" => again::<Verdict>(value, at),
        other => panic!("{at}: no Rust type mapped for schema {other}"),
    };
    assert_eq!(
        &back, value,
        "{at}: the example does not survive a round trip"
    );
}

fn refs(v: &Value, at: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref") {
                out.push((at.clone(), r.as_str().expect("$ref is a string").to_owned()));
            }
            for (k, child) in map {
                refs(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                refs(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_ref_resolves() {
    let doc = doc();
    let mut found = Vec::new();
    refs(&doc, "#".into(), &mut found);
    assert!(found.len() > 20, "only {} $refs found", found.len());
    for (at, r) in found {
        let target = resolve(&doc, &r);
        assert!(
            target.is_object(),
            "{at}: $ref {r:?} is not a schema object"
        );
    }
    // Discriminator mappings are references too.
    for schema in doc["components"]["schemas"].as_object().unwrap().values() {
        for target in schema["discriminator"]["mapping"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            resolve(&doc, target.as_str().unwrap());
        }
    }
    // Security requirements name declared schemes.
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    for item in doc["paths"].as_object().unwrap().values() {
        for op in item.as_object().unwrap().values() {
            for req in op["security"].as_array().into_iter().flatten() {
                for scheme in req.as_object().unwrap().keys() {
                    assert!(
                        schemes.contains_key(scheme),
                        "unknown security scheme {scheme}"
                    );
                }
            }
        }
    }
}
