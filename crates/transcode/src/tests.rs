//! The transcoder against the Bookstore sample (examples/bookstore-grpc) and a test variant
//! shaped like ESPv2's test bookstore (enum, Any, `price_in_usd`, wildcards, a custom verb,
//! streaming, `response_body`, `HttpBody`). Descriptor sets are compiled with protox and
//! deployed through `portico_config::grpc::convert`, so the transcoder is built from exactly
//! what the control plane stores.

use super::*;
use base64::Engine;
use portico_config::grpc::{convert, FileType, GrpcSource};
use portico_config::Service;
use prost_reflect::{DynamicMessage, ReflectMessage};
use std::path::{Path, PathBuf};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookstore-grpc")
}

const TEST_PROTO: &str = r#"
syntax = "proto3";
package endpoints.examples.bookstore;
import "google/api/annotations.proto";
import "google/api/httpbody.proto";
import "google/protobuf/any.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";

service Bookstore {
  rpc ListShelves(google.protobuf.Empty) returns (ListShelvesResponse) {
    option (google.api.http) = { get: "/v1/shelves" };
  }
  rpc CreateShelf(CreateShelfRequest) returns (Shelf) {
    option (google.api.http) = { post: "/v1/shelves" body: "shelf" };
  }
  rpc GetShelf(GetShelfRequest) returns (Shelf) {
    option (google.api.http) = { get: "/v399/abcdefg_shelves/{shelf}" };
  }
  rpc ListBooks(ListBooksRequest) returns (ListBooksResponse) {
    option (google.api.http) = { get: "/v1/shelves/{shelf}/books" };
  }
  rpc CreateBook(CreateBookRequest) returns (Book) {
    option (google.api.http) = {
      post: "/v1/shelves/{shelf}/books" body: "book"
      additional_bindings { post: "/v1/shelves/{shelf}/books/{book.id}/{book.author}" body: "book" }
    };
  }
  rpc CreateBookWithTrailingSingleWildcard(CreateBookRequest) returns (Book) {
    option (google.api.http) = { post: "/v1/shelves/{shelf}/single/*" body: "book" };
  }
  rpc CreateBookWithCustomVerb(CreateBookRequest) returns (Book) {
    option (google.api.http) = { post: "/v1/shelves/{shelf}:registeredCustomVerb" body: "book" };
  }
  rpc DeleteBook(DeleteBookRequest) returns (google.protobuf.Empty) {
    option (google.api.http) = { delete: "/v1/shelves/{shelf}/books/{book}" };
  }
  rpc GetResource(ResourceRequest) returns (Shelf) {
    option (google.api.http) = { get: "/v1/{name=rooms/*}" response_body: "theme" };
  }
  rpc SearchBooks(SearchRequest) returns (ListBooksResponse) {
    option (google.api.http) = { get: "/v1/search" response_body: "books" };
  }
  rpc WholeBody(CreateBookRequest) returns (Book) {
    option (google.api.http) = { put: "/v1/whole/{shelf}" body: "*" };
  }
  rpc StreamBooks(ListBooksRequest) returns (stream Book) {
    option (google.api.http) = { get: "/v1/shelves/{shelf}/books:stream" };
  }
  rpc BulkCreateShelf(stream CreateShelfRequest) returns (ListShelvesResponse) {
    option (google.api.http) = { post: "/v1/shelves:bulk" body: "*" };
  }
  rpc Upload(UploadRequest) returns (google.api.HttpBody) {
    option (google.api.http) = { post: "/v1/upload/{name}" body: "raw" };
  }
  rpc Any(AnyCatchAll) returns (Shelf) {
    option (google.api.http) = { custom: { kind: "*" path: "/any/**" } };
  }
}

message Shelf {
  int64 id = 1;
  string theme = 2;
  google.protobuf.Any any = 3;
}
message ObjectOnlyForAny { int32 id = 1; string name = 2; }
message Book {
  int64 id = 1;
  string author = 2;
  string title = 3;
  enum TYPE { CLASSIC = 0; COMIC = 1; HORROR = 2; OTHER = 3; }
  TYPE type = 4;
  int32 price_in_usd = 5;
  repeated string quotes = 6;
  google.protobuf.Timestamp published = 7;
  google.protobuf.Int32Value pages = 8;
  bool signed = 9;
  map<string, TYPE> labels = 10;
  string renamed = 11 [json_name = "otherName"];
}
message ListShelvesResponse { repeated Shelf shelves = 1; }
message CreateShelfRequest { Shelf shelf = 1; }
message GetShelfRequest { int64 shelf = 1; }
message ListBooksRequest { int64 shelf = 1; }
message ListBooksResponse { repeated Book books = 1; }
message CreateBookRequest { int64 shelf = 1; Book book = 2; }
message DeleteBookRequest { int64 shelf = 1; int64 book = 2; }
message ResourceRequest { string name = 1; }
message SearchRequest { repeated string authors = 1; Book.TYPE type = 2; Filter filter = 3; repeated Book examples = 4; }
message Filter { string text = 1; Inner inner = 2; }
message Inner { uint64 big = 1; }
message UploadRequest { string name = 1; google.api.HttpBody raw = 2; }
message AnyCatchAll { string path = 1; }
"#;

const HTTPBODY_PROTO: &str = r#"
syntax = "proto3";
package google.api;
import "google/protobuf/any.proto";
message HttpBody {
  string content_type = 1;
  bytes data = 2;
  repeated google.protobuf.Any extensions = 3;
}
"#;

const TEST_YAML: &str = r#"
type: google.api.Service
config_version: 3
name: bookstore.endpoints.demo-proj.cloud.goog
apis:
- name: endpoints.examples.bookstore.Bookstore
http:
  rules:
  - selector: endpoints.examples.bookstore.Bookstore.GetShelf
    get: /v1/shelves/{shelf=*}
    additional_bindings:
    - get: /v1/fixedshelves/{shelf=100}
  - selector: endpoints.examples.bookstore.Bookstore.ListBooks
    get: /v1/shelves/{shelf}/books
    additional_bindings:
    - get: /v1/custom/shelves/{shelf}/custom/books
system_parameters:
  rules:
  - selector: "*"
    parameters:
    - name: api_key
      url_query_parameter: my_key
"#;

fn compile(dir: &Path, open: &str) -> Vec<u8> {
    let mut c = protox::Compiler::new([dir.to_path_buf(), example_dir()]).expect("compiler");
    c.include_imports(true).include_source_info(true);
    c.open_files([open]).expect("compile");
    c.encode_file_descriptor_set()
}

fn deploy(set: Vec<u8>, yaml: &str) -> Service {
    let files = [
        GrpcSource::new(FileType::FileDescriptorSetProto, "api_descriptor.pb", set),
        GrpcSource::new(
            FileType::ServiceConfigYaml,
            "api_config.yaml",
            yaml.as_bytes().to_vec(),
        ),
    ];
    convert(&files).expect("deploy").service
}

fn test_service() -> Service {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("test.proto"), TEST_PROTO).expect("write");
    std::fs::create_dir_all(dir.path().join("google/api")).expect("mkdir");
    std::fs::write(dir.path().join("google/api/httpbody.proto"), HTTPBODY_PROTO).expect("write");
    deploy(compile(dir.path(), "test.proto"), TEST_YAML)
}

fn with(options: Options) -> Transcoder {
    Transcoder::from_service(&test_service(), options).expect("transcoder")
}

fn t() -> Transcoder {
    with(Options::default())
}

/// The request message, decoded, printed as canonical JSON with every field.
fn request_json(t: &Transcoder, method: &str, target: &str, body: &str) -> serde_json::Value {
    let call = t
        .route(method, target)
        .unwrap_or_else(|e| panic!("{target}: {e:?}"));
    let msgs = call
        .request_messages(body.as_bytes(), Some("application/json"))
        .unwrap_or_else(|e| panic!("{target}: {e}"));
    assert_eq!(msgs.len(), 1);
    let msg = DynamicMessage::decode(call.method().input(), msgs[0].as_slice()).expect("decode");
    serde_json::to_value(&msg).expect("json")
}

fn request_err(t: &Transcoder, method: &str, target: &str, body: &str) -> RequestError {
    t.route(method, target)
        .expect("route")
        .request_messages(body.as_bytes(), None)
        .expect_err("should fail")
}

/// Encodes a response message of `call`'s output type from JSON.
fn encode_output(call: &Call<'_>, json: &str) -> Vec<u8> {
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize(call.method().output(), &mut de).expect("output json");
    prost::Message::encode_to_vec(&msg)
}

fn print(t: &Transcoder, method: &str, target: &str, outputs: &[&str]) -> String {
    let call = t.route(method, target).expect("route");
    let mut w = call.response();
    let mut out = Vec::new();
    for o in outputs {
        out.extend_from_slice(&w.message(&encode_output(&call, o)).expect("print"));
    }
    out.extend_from_slice(&w.finish());
    String::from_utf8(out).expect("utf8")
}

#[test]
fn bookstore_sample_routes_from_its_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let set = compile(dir.path(), "bookstore.proto");
    let yaml = std::fs::read_to_string(example_dir().join("api_config.yaml")).expect("yaml");
    let t = Transcoder::from_service(&deploy(set, &yaml), Options::default()).expect("build");
    let call = t.route("GET", "/v1/shelves/200").expect("route");
    assert_eq!(
        call.grpc_path(),
        "/endpoints.examples.bookstore.Bookstore/GetShelf"
    );
    assert_eq!(
        call.selector(),
        "endpoints.examples.bookstore.Bookstore.GetShelf"
    );
    assert_eq!(
        request_json(&t, "GET", "/v1/shelves/200?key=k", ""),
        serde_json::json!({"shelf": "200"})
    );
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/v1/shelves/100/books",
            r#"{"id": 4, "author":"Leo Tolstoy","title":"War and Peace"}"#
        ),
        serde_json::json!({"shelf":"100","book":{"id":"4","author":"Leo Tolstoy","title":"War and Peace"}})
    );
    assert_eq!(
        t.route("DELETE", "/v1/shelves/1/books/2")
            .unwrap()
            .selector(),
        "endpoints.examples.bookstore.Bookstore.DeleteBook"
    );
}

#[test]
fn no_descriptor_set_is_an_error() {
    let svc = Service::default();
    assert_eq!(
        Transcoder::from_service(&svc, Options::default()).unwrap_err(),
        BuildError::NoDescriptorSet
    );
}

#[test]
fn yaml_rules_replace_options_and_additional_bindings_route() {
    let t = t();
    // The option's path is replaced by the config's rule.
    assert_eq!(
        t.route("GET", "/v399/abcdefg_shelves/1").unwrap_err(),
        RouteError::NotFound
    );
    assert_eq!(
        request_json(&t, "GET", "/v1/shelves/200", ""),
        serde_json::json!({"shelf":"200"})
    );
    // {shelf=100}: only that value.
    assert_eq!(
        request_json(&t, "GET", "/v1/fixedshelves/100", ""),
        serde_json::json!({"shelf":"100"})
    );
    assert_eq!(
        t.route("GET", "/v1/fixedshelves/101").unwrap_err(),
        RouteError::NotFound
    );
    assert_eq!(
        t.route("GET", "/v1/custom/shelves/100/custom/books")
            .unwrap()
            .selector(),
        "endpoints.examples.bookstore.Bookstore.ListBooks"
    );
}

#[test]
fn wrong_verb_names_the_template() {
    assert_eq!(
        t().route("DELETE", "/v1/shelves").unwrap_err(),
        RouteError::MethodNotAllowed {
            template: "/v1/shelves".into()
        }
    );
}

#[test]
fn nested_path_fields_and_percent_decoding() {
    let t = t();
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/v1/shelves/100/books/5/Mark",
            r#"{"title":"The Adventures of Huckleberry Finn"}"#
        ),
        serde_json::json!({"shelf":"100","book":{"id":"5","author":"Mark","title":"The Adventures of Huckleberry Finn"}})
    );
    assert_eq!(
        request_json(&t, "POST", "/v1/shelves/100/books/6/Foo%2FBar%2FBaz", "")["book"]["author"],
        "Foo/Bar/Baz"
    );
}

#[test]
fn multi_segment_variable_keeps_the_literal_text() {
    let t = t();
    assert_eq!(
        request_json(&t, "GET", "/v1/shelves/123", "")["shelf"],
        "123",
        "GetShelf, not GetResource"
    );
    let t2 = t;
    let call = t2.route("GET", "/v1/shelves/a%2Fb").expect("route");
    // `{shelf=*}` is an int64: a%2Fb reaches GetShelf and fails as a number, precisely.
    assert_eq!(
        call.selector(),
        "endpoints.examples.bookstore.Bookstore.GetShelf"
    );
    let err = call.request_messages(b"", None).unwrap_err();
    assert_eq!(err.http_status(), 400);
}

#[test]
fn name_equals_pattern_binds_the_whole_match() {
    // `{name=rooms/*}`: the literal text too, `%2F` left encoded.
    assert_eq!(
        request_json(&t(), "GET", "/v1/rooms/12%2F3", ""),
        serde_json::json!({"name":"rooms/12%2F3"})
    );
    assert_eq!(
        t().route("GET", "/v1/rooms/1/2").unwrap_err(),
        RouteError::NotFound
    );
}

#[test]
fn query_parameters_fill_nested_and_repeated_fields_after_the_body() {
    let t = t();
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/v1/shelves/100/books?key=api-key&book.author=Leo%20Tolstoy&book.title=War+and+Peace",
            r#"{"id": 14}"#
        ),
        serde_json::json!({"shelf":"100","book":{"id":"14","author":"Leo Tolstoy","title":"War and Peace"}})
    );
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/v1/shelves/3/books?book.quotes=A&book.quotes=B",
            r#"{"quotes":["x","y"]}"#
        )["book"]["quotes"],
        serde_json::json!(["x", "y", "A", "B"])
    );
    // Nested message through the query, lowerCamel spelling, uint64 kept exact, enum by name.
    assert_eq!(
        request_json(
            &t,
            "GET",
            "/v1/search?authors=a&authors=b&type=COMIC&filter.text=t&filter.inner.big=18446744073709551615",
            ""
        ),
        serde_json::json!({"authors":["a","b"],"type":"COMIC","filter":{"text":"t","inner":{"big":"18446744073709551615"}}})
    );
    // Enum by number, bool, wrapper and Timestamp from text.
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/v1/shelves/1/books?book.type=2&book.signed=true&book.pages=300&book.published=2020-01-02T03:04:05Z&book.priceInUsd=7",
            ""
        )["book"],
        serde_json::json!({"type":"HORROR","signed":true,"pages":300,"published":"2020-01-02T03:04:05Z","priceInUsd":7})
    );
}

#[test]
fn no_body_post_takes_fields_from_the_query() {
    // §5.3 case 8.
    assert_eq!(
        request_json(
            &t(),
            "POST",
            "/v1/shelves?key=api-key&shelf.id=123&shelf.theme=kids",
            ""
        ),
        serde_json::json!({"shelf":{"id":"123","theme":"kids"}})
    );
}

#[test]
fn plus_unescaping_can_be_disabled() {
    let t = with(Options {
        query_parameters_disable_unescape_plus: true,
        ..Options::default()
    });
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/v1/shelves/1/books?book.title=War+and%20Peace",
            ""
        )["book"]["title"],
        "War+and Peace"
    );
}

#[test]
fn unknown_query_parameters_are_415_unless_ignored() {
    let t0 = t();
    let e = request_err(&t0, "GET", "/v1/shelves/200?key=api_key&foo=bar", "");
    assert_eq!(e, RequestError::UnknownQueryParameter("foo".into()));
    assert_eq!(e.http_status(), 415);
    // key, api_key, access_token and the config's own key parameter are never fields.
    request_json(
        &t0,
        "GET",
        "/v1/shelves/200?key=a&api_key=b&access_token=c&my_key=d",
        "",
    );
    // A path into a scalar is unknown too.
    assert_eq!(
        request_err(&t0, "GET", "/v1/shelves/200?shelf.x=1", ""),
        RequestError::UnknownQueryParameter("shelf.x".into())
    );

    let listed = with(Options {
        ignore_query_parameters: vec!["foo".into()],
        ..Options::default()
    });
    request_json(&listed, "GET", "/v1/shelves/200?foo=bar", "");
    assert_eq!(
        request_err(&listed, "GET", "/v1/shelves/200?foo=1&bar=2", ""),
        RequestError::UnknownQueryParameter("bar".into())
    );
    let any = with(Options {
        ignore_unknown_query_parameters: true,
        ..Options::default()
    });
    assert_eq!(
        request_json(&any, "GET", "/v1/shelves/200?foo=bar&baz", ""),
        serde_json::json!({"shelf":"200"})
    );
}

#[test]
fn unknown_query_parameters_are_found_before_the_body() {
    let t0 = t();
    let unknown =
        |t: &Transcoder, target: &str| t.route("GET", target).unwrap().unknown_query_parameter();
    assert_eq!(
        unknown(&t0, "/v1/shelves/200?key=k&foo=bar"),
        Some("foo".into())
    );
    assert_eq!(
        unknown(&t0, "/v1/shelves/200?shelf.x=1"),
        Some("shelf.x".into())
    );
    assert_eq!(unknown(&t0, "/v1/shelves/200?key=k&api_key=b"), None);
    // A known field with a bad value is not unknown: the transcoding refuses it (400).
    assert_eq!(unknown(&t0, "/v1/shelves/200?shelf=abc"), None);
    let any = with(Options {
        ignore_unknown_query_parameters: true,
        ..Options::default()
    });
    assert_eq!(unknown(&any, "/v1/shelves/200?foo=bar"), None);
}

#[test]
fn repeated_messages_and_maps_cannot_come_from_the_query() {
    let t = t();
    let e = request_err(&t, "GET", "/v1/search?examples.id=1", "");
    assert!(
        e.to_string().contains("'examples' is a repeated field"),
        "{e}"
    );
    let e = request_err(&t, "POST", "/v1/shelves/1/books?book.labels=x", "");
    assert!(e.to_string().contains("map field"), "{e}");
    let e = request_err(&t, "GET", "/v1/search?filter=x", "");
    assert!(e.to_string().contains("is a message"), "{e}");
    let e = request_err(&t, "POST", "/v1/shelves/1/books?book.signed=maybe", "");
    assert_eq!(
        e.to_string(),
        "Invalid value for bool field book.signed: \"maybe\""
    );
}

#[test]
fn whole_body_both_spellings_json_name_and_unknown_fields() {
    let t = t();
    assert_eq!(
        request_json(
            &t,
            "PUT",
            "/v1/whole/9",
            r#"{"book":{"price_in_usd":3,"otherName":"r","nope":{"deep":[1]}},"unknownTop":1}"#
        ),
        serde_json::json!({"shelf":"9","book":{"priceInUsd":3,"otherName":"r"}})
    );
    // A query value lands on the key the body already used (no duplicate-field error).
    assert_eq!(
        request_json(
            &t,
            "PUT",
            "/v1/whole/9?book.priceInUsd=5",
            r#"{"book":{"price_in_usd":3}}"#
        )["book"]["priceInUsd"],
        5
    );
    // The path variable wins over the body for the same field.
    assert_eq!(
        request_json(&t, "PUT", "/v1/whole/9", r#"{"shelf":"1"}"#)["shelf"],
        "9"
    );
}

#[test]
fn default_post_binding_exists_for_every_method() {
    let t = t();
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/endpoints.examples.bookstore.Bookstore/CreateBook?key=api-key",
            r#"{"shelf":100,"book":{"id":"7","title":"x"}}"#
        ),
        serde_json::json!({"shelf":"100","book":{"id":"7","title":"x"}})
    );
    assert_eq!(
        request_json(
            &t,
            "POST",
            "/endpoints.examples.bookstore.Bookstore/GetShelf",
            r#"{"shelf":"200"}"#
        ),
        serde_json::json!({"shelf":"200"})
    );
    assert!(matches!(
        t.route("GET", "/endpoints.examples.bookstore.Bookstore/GetShelf"),
        Err(RouteError::MethodNotAllowed { .. })
    ));
}

#[test]
fn malformed_json_is_400_with_espv2_text() {
    let t = t();
    let e = request_err(&t, "POST", "/v1/shelves", "NO_BRACES_JSON");
    assert_eq!(e.http_status(), 400);
    assert_eq!(e.to_string(), "Unexpected token.\nNO_BRACES_JSON\n^");
    let e = request_err(&t, "POST", "/v1/shelves", r#"{"theme" : "Children""#);
    assert_eq!(
        e.to_string(),
        "Unexpected end of string. Expected , or } after key:value pair.\n\n^"
    );
    // Wrong JSON type for a field: 400 naming the problem.
    let e = request_err(&t, "POST", "/v1/shelves", r#"{"id":{"x":1}}"#);
    assert_eq!(e.http_status(), 400);
    assert!(e.to_string().starts_with("Invalid request body:"), "{e}");
    // A body that must be an object.
    let e = request_err(&t, "PUT", "/v1/whole/1", "[1]");
    assert_eq!(e.http_status(), 400);
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let body = format!("{}{}", "{\"shelf\":".repeat(100_000), "}".repeat(100_000));
    let e = request_err(&t(), "POST", "/v1/shelves", &body);
    assert_eq!(e.http_status(), 400);
}

#[test]
fn any_resolves_with_the_pool() {
    let t = t();
    let req = request_json(
        &t,
        "POST",
        "/v1/shelves?key=api-key",
        r#"{"id":"1","any":{"@type":"type.googleapis.com/endpoints.examples.bookstore.ObjectOnlyForAny","id":"123","name":"name"}}"#,
    );
    assert_eq!(req["shelf"]["any"]["id"], 123);
    let e = request_err(
        &t,
        "POST",
        "/v1/shelves",
        r#"{"any":{"@type":"type.googleapis.com/no.Such"}}"#,
    );
    assert_eq!(e.http_status(), 400);
}

#[test]
fn case_insensitive_enums_only_with_the_flag() {
    let body = r#"{"type":"comic","labels":{"a":"horror"}}"#;
    // Without the flag an unknown enum name is ignored like an unknown field (protobuf's
    // ignore_unknown_fields, which ESP sets): the values are dropped.
    assert_eq!(
        request_json(&t(), "POST", "/v1/shelves/1/books", body),
        serde_json::json!({"shelf":"1","book":{}})
    );
    let ci = with(Options {
        case_insensitive_enum_parsing: true,
        ..Options::default()
    });
    assert_eq!(
        request_json(&ci, "POST", "/v1/shelves/1/books", body)["book"],
        serde_json::json!({"type":"COMIC","labels":{"a":"HORROR"}})
    );
}

#[test]
fn custom_verbs_and_wildcards() {
    let t0 = t();
    assert_eq!(
        t0.route("POST", "/v1/shelves/100:registeredCustomVerb")
            .unwrap()
            .selector(),
        "endpoints.examples.bookstore.Bookstore.CreateBookWithCustomVerb"
    );
    // §5.3 case 20: an unregistered verb is segment text for `*` ...
    assert_eq!(
        t0.route(
            "POST",
            "/v1/shelves/100/single/random:unregisteredCustomVerb"
        )
        .unwrap()
        .selector(),
        "endpoints.examples.bookstore.Bookstore.CreateBookWithTrailingSingleWildcard"
    );
    // ... unless the flag makes every `:x` a verb.
    let strict = with(Options {
        match_unregistered_custom_verb: true,
        ..Options::default()
    });
    assert_eq!(
        strict
            .route(
                "POST",
                "/v1/shelves/100/single/random:unregisteredCustomVerb"
            )
            .unwrap_err(),
        RouteError::NotFound
    );
    // Case 19: a verb some template declares is a verb, so the wildcard route does not take
    // it (ESPv2's transcoder: NOT_FOUND, the request goes on untranscoded) ...
    for path in [
        "/v1/shelves/100/single/random:registeredCustomVerb",
        "/v1/shelves/100/double/a/b:registeredCustomVerb",
    ] {
        assert_eq!(
            t0.route("POST", path).unwrap_err(),
            RouteError::NotFound,
            "{path}"
        );
    }
    // ... while the template with that verb still matches.
    assert!(t0
        .route("POST", "/v1/shelves/7:registeredCustomVerb")
        .is_ok());
    // custom kind "*": any method.
    assert_eq!(
        t0.route("PATCH", "/any/x/y").unwrap().selector(),
        "endpoints.examples.bookstore.Bookstore.Any"
    );
}

#[test]
fn response_printing_options() {
    let target = "/v1/shelves/100/books";
    let book = r#"{"id":"4","type":"CLASSIC","priceInUsd":0}"#;
    // §5.3 case 21.
    assert_eq!(print(&t(), "POST", target, &[book]), r#"{"id":"4"}"#);
    let all = with(Options {
        always_print_primitive_fields: true,
        ..Options::default()
    });
    let printed: serde_json::Value =
        serde_json::from_str(&print(&all, "POST", target, &[book])).unwrap();
    assert_eq!(printed["author"], "");
    assert_eq!(printed["type"], "CLASSIC");
    assert_eq!(printed["priceInUsd"], 0);
    let ints = with(Options {
        always_print_enums_as_ints: true,
        ..Options::default()
    });
    assert_eq!(
        print(&ints, "POST", target, &[r#"{"id":"4","type":"COMIC"}"#]),
        r#"{"id":"4","type":1}"#
    );
    let names = with(Options {
        preserve_proto_field_names: true,
        ..Options::default()
    });
    assert_eq!(
        print(&names, "POST", target, &[r#"{"id":"4","priceInUsd":100}"#]),
        r#"{"id":"4","price_in_usd":100}"#
    );
    assert_eq!(
        print(&t(), "POST", target, &[r#"{"renamed":"x"}"#]),
        r#"{"otherName":"x"}"#
    );
}

#[test]
fn response_body_prints_only_that_field() {
    let t0 = t();
    assert_eq!(
        print(
            &t0,
            "GET",
            "/v1/search",
            &[r#"{"books":[{"id":"1"},{"id":"2"}]}"#]
        ),
        r#"[{"id":"1"},{"id":"2"}]"#
    );
    assert_eq!(print(&t0, "GET", "/v1/search", &["{}"]), "[]");
    // A scalar response_body at its default is printed, not left out.
    assert_eq!(
        print(&t0, "GET", "/v1/rooms/x", &[r#"{"id":"1"}"#]),
        r#""""#
    );
    assert_eq!(
        print(&t0, "GET", "/v1/rooms/x", &[r#"{"theme":"kids"}"#]),
        r#""kids""#
    );
}

#[test]
fn server_streams_are_a_json_array_or_lines() {
    let target = "/v1/shelves/1/books:stream";
    let t0 = t();
    assert_eq!(
        print(&t0, "GET", target, &[r#"{"id":"1"}"#, r#"{"id":"2"}"#]),
        r#"[{"id":"1"},{"id":"2"}]"#
    );
    assert_eq!(print(&t0, "GET", target, &[]), "[]");
    let nl = with(Options {
        stream_newline_delimited: true,
        ..Options::default()
    });
    assert_eq!(
        print(&nl, "GET", target, &[r#"{"id":"1"}"#, r#"{"id":"2"}"#]),
        "{\"id\":\"1\"}\n{\"id\":\"2\"}\n"
    );
}

#[test]
fn client_stream_body_array_is_one_message_each() {
    let t = t();
    let call = t.route("POST", "/v1/shelves:bulk").expect("route");
    let msgs = call
        .request_messages(
            br#"[{"shelf":{"id":1}},{"shelf":{"id":2}},{"shelf":{"id":3}}]"#,
            None,
        )
        .expect("messages");
    assert_eq!(msgs.len(), 3);
    let one = DynamicMessage::decode(call.method().input(), msgs[2].as_slice()).unwrap();
    assert_eq!(
        serde_json::to_value(&one).unwrap(),
        serde_json::json!({"shelf":{"id":"3"}})
    );
}

#[test]
fn http_body_in_and_out() {
    let t = t();
    let call = t.route("POST", "/v1/upload/n1").expect("route");
    let msgs = call
        .request_messages(b"\x00raw bytes", Some("application/octet-stream"))
        .expect("messages");
    let m = DynamicMessage::decode(call.method().input(), msgs[0].as_slice()).unwrap();
    assert_eq!(
        serde_json::to_value(&m).unwrap(),
        serde_json::json!({"name":"n1","raw":{"contentType":"application/octet-stream","data":base64::engine::general_purpose::STANDARD.encode(b"\x00raw bytes")}})
    );
    let mut w = call.response();
    assert!(w.is_http_body());
    let out = encode_output(&call, r#"{"contentType":"text/csv","data":"YSxi"}"#);
    assert_eq!(w.message(&out).unwrap().as_ref(), b"a,b");
    assert_eq!(w.content_type(), "text/csv");
    assert!(w.finish().is_empty());
}

#[test]
fn garbage_from_the_backend_is_an_error_not_a_panic() {
    let t = t();
    let call = t.route("GET", "/v1/shelves/1").expect("route");
    let mut w = call.response();
    assert!(w.message(&[0xff, 0xff, 0xff]).is_err());
    assert_eq!(
        call.method().output().full_name(),
        "endpoints.examples.bookstore.Shelf"
    );
    let _ = DynamicMessage::new(call.method().output()).descriptor();
}
