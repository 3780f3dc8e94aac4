//! Descriptor sets are compiled here from examples/bookstore-grpc (and small protos written for
//! a test) with protox, the way protoc --include_imports --include_source_info builds them.

use super::*;
use std::path::{Path, PathBuf};

const PKG: &str = "endpoints.examples.bookstore.Bookstore";

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookstore-grpc")
}

fn example(name: &str) -> String {
    std::fs::read_to_string(example_dir().join(name)).expect("example file")
}

/// Compiles `open` (files among `extra`, or the example's) with the example directory on the
/// include path.
fn compile(extra: &[(&str, &str)], open: &[&str], imports: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in extra {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write proto");
    }
    let mut c = protox::Compiler::new([dir.path().to_path_buf(), example_dir()]).expect("compiler");
    c.include_imports(imports).include_source_info(true);
    c.open_files(open).expect("compile");
    c.encode_file_descriptor_set()
}

fn bookstore_set() -> Vec<u8> {
    compile(&[], &["bookstore.proto"], true)
}

fn set(bytes: Vec<u8>) -> GrpcSource {
    GrpcSource::new(FileType::FileDescriptorSetProto, "api_descriptor.pb", bytes)
}

fn yaml(name: &str, text: &str) -> GrpcSource {
    GrpcSource::new(FileType::ServiceConfigYaml, name, text.as_bytes().to_vec())
}

const HEAD: &str = "type: google.api.Service\nconfig_version: 3\nname: bookstore.endpoints.demo-proj.cloud.goog\napis:\n- name: endpoints.examples.bookstore.Bookstore\n";

fn ok(files: &[GrpcSource]) -> Conversion {
    match convert(files) {
        Ok(c) => c,
        Err(e) => panic!("conversion failed:\n{e}\n{:?}", e.diagnostics),
    }
}

fn errors(files: &[GrpcSource]) -> Vec<String> {
    match convert(files) {
        Ok(c) => panic!("converted, warnings {:?}", c.warnings),
        Err(e) => e.errors().map(|d| d.to_string()).collect(),
    }
}

fn http_rule<'s>(svc: &'s Service, method: &str) -> Option<&'s HttpRule> {
    let sel = format!("{PKG}.{method}");
    svc.http.as_ref()?.rules.iter().find(|r| r.selector == sel)
}

#[test]
fn bookstore_with_keys_fills_apis_and_rules_from_the_descriptor() {
    let c = ok(&[
        set(bookstore_set()),
        yaml("api_config.yaml", &example("api_config.yaml")),
    ]);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let svc = c.service;
    assert_eq!(svc.name, "bookstore.endpoints.demo-proj.cloud.goog");
    assert_eq!(svc.title, "Bookstore gRPC API");
    assert_eq!(svc.config_version, 3);
    assert_eq!(svc.apis.len(), 1);
    let api = &svc.apis[0];
    assert_eq!(api.name, PKG);
    assert_eq!(api.version, "v1");
    assert_eq!(api.syntax, "SYNTAX_PROTO3");
    assert_eq!(
        api.source_context.as_ref().map(|s| s.file_name.as_str()),
        Some("bookstore.proto")
    );
    let names: Vec<&str> = api.methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ListShelves",
            "CreateShelf",
            "GetShelf",
            "DeleteShelf",
            "ListBooks",
            "CreateBook",
            "GetBook",
            "DeleteBook",
            "StreamBooks",
            "BulkCreateShelf",
            "EchoBooks",
            "ReturnBadStatus",
            "CreateBookWithTrailingSingleWildcard",
            "CreateBookWithTrailingDoubleWildcard",
            "CreateBookWithCustomVerb"
        ]
    );
    let list = &api.methods[0];
    assert_eq!(
        list.request_type_url,
        "type.googleapis.com/google.protobuf.Empty"
    );
    assert_eq!(
        list.response_type_url,
        "type.googleapis.com/endpoints.examples.bookstore.ListShelvesResponse"
    );
    assert!(!list.request_streaming && !list.response_streaming);
    assert!(api.methods[8].response_streaming && !api.methods[8].request_streaming);
    assert!(api.methods[9].request_streaming && !api.methods[9].response_streaming);
    assert!(api.methods[10].request_streaming && api.methods[10].response_streaming);
    // Streaming flags appear in the JSON only when set, as Google emits them.
    let json = serde_json::to_value(&api.methods).unwrap();
    assert_eq!(json[8]["responseStreaming"], true);
    assert!(json[0].get("requestStreaming").is_none());

    // Annotations: one rule per annotated method, full selectors; StreamBooks has none.
    let http = &svc.http.as_ref().unwrap().rules;
    assert_eq!(http.len(), 11, "{http:?}");
    assert_eq!(
        http_rule(&svc, "ListShelves").unwrap().get.as_deref(),
        Some("/v1/shelves")
    );
    let create = http_rule(&svc, "CreateBook").unwrap();
    assert_eq!(create.post.as_deref(), Some("/v1/shelves/{shelf}/books"));
    assert_eq!(create.body, "book");
    assert_eq!(create.additional_bindings.len(), 1);
    assert_eq!(
        create.additional_bindings[0].post.as_deref(),
        Some("/v1/shelves/{shelf}/books/{book.id}/{book.author}")
    );
    assert!(http_rule(&svc, "StreamBooks").is_none());

    // Only the declared usage rule, with its exact selector.
    let usage = &svc.usage.as_ref().unwrap().rules;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].selector, format!("{PKG}.ListShelves"));
    assert!(usage[0].allow_unregistered_calls);

    assert!(svc.has_service_control());
    assert_eq!(svc.endpoints[0].name, svc.name);
    assert!(svc
        .metrics
        .iter()
        .any(|m| m.name.ends_with("/consumer/request_count")));
    assert_eq!(svc.logs[0].name, "endpoints_log");
    // ESP v1's streaming metrics are declared and monitored, as Google's compiler does for
    // gRPC services.
    for side in ["producer", "consumer"] {
        let name =
            format!("serviceruntime.googleapis.com/api/{side}/streaming_request_message_counts");
        assert!(svc.metrics.iter().any(|m| m.name == name), "{name}");
        let mon = svc.monitoring.as_ref().unwrap();
        let dests = if side == "producer" {
            &mon.producer_destinations
        } else {
            &mon.consumer_destinations
        };
        assert!(dests[0].metrics.contains(&name), "{name}");
    }
    let files = &svc.source_info.as_ref().unwrap().source_files;
    assert_eq!(files.len(), 2);
    assert_eq!(files[0]["fileType"], "FILE_DESCRIPTOR_SET_PROTO");
    assert_eq!(files[0]["filePath"], "api_descriptor.pb");
    assert_eq!(files[1]["fileType"], "SERVICE_CONFIG_YAML");
    // The descriptor is kept byte for byte (standard base64).
    let kept = base64::engine::general_purpose::STANDARD
        .decode(files[0]["fileContents"].as_str().unwrap())
        .unwrap();
    assert_eq!(kept, bookstore_set());
}

#[test]
fn yaml_http_rules_replace_annotations_and_files_merge() {
    let c = ok(&[
        set(bookstore_set()),
        yaml("api_config.yaml", &example("api_config.yaml")),
        yaml("api_config_http.yaml", &example("api_config_http.yaml")),
    ]);
    let svc = c.service;
    // Singular fields: the later file has no title, so the first file's stays.
    assert_eq!(svc.title, "Bookstore gRPC API");
    let list = http_rule(&svc, "ListShelves").unwrap();
    assert_eq!(list.get.as_deref(), Some("/v2/shelves"));
    // Replaced entirely: the annotation's body "shelf" is gone, the YAML's "*" is used.
    let create = http_rule(&svc, "CreateShelf").unwrap();
    assert_eq!(create.post.as_deref(), Some("/v2/shelves"));
    assert_eq!(create.body, "*");
    // A method without an annotation gets the YAML rule.
    assert_eq!(
        http_rule(&svc, "StreamBooks").unwrap().get.as_deref(),
        Some("/v2/shelves/{shelf}/books:stream")
    );
    // Methods the YAML does not name keep their annotation.
    assert_eq!(
        http_rule(&svc, "GetBook").unwrap().get.as_deref(),
        Some("/v1/shelves/{shelf}/books/{book}")
    );
    assert_eq!(svc.http.as_ref().unwrap().rules.len(), 12);
    let files = &svc.source_info.as_ref().unwrap().source_files;
    assert_eq!(files.len(), 3);
}

#[test]
fn repeated_fields_append_and_singular_fields_are_replaced_across_files() {
    let a = format!("{HEAD}title: First\nusage:\n  rules:\n  - selector: {PKG}.GetShelf\n    allow_unregistered_calls: true\n");
    let b = format!(
        "type: google.api.Service\nconfig_version: 3\nname: bookstore.endpoints.demo-proj.cloud.goog\ntitle: Second\nusage:\n  rules:\n  - selector: {PKG}.GetBook\n    allow_unregistered_calls: true\n"
    );
    let svc = ok(&[set(bookstore_set()), yaml("a.yaml", &a), yaml("b.yaml", &b)]).service;
    assert_eq!(svc.title, "Second");
    let sels: Vec<String> = svc
        .usage
        .unwrap()
        .rules
        .into_iter()
        .map(|r| r.selector)
        .collect();
    assert_eq!(sels, [format!("{PKG}.GetShelf"), format!("{PKG}.GetBook")]);
}

#[test]
fn wildcards_expand_per_method_and_the_last_matching_rule_wins() {
    let text = format!(
        "{HEAD}usage:\n  rules:\n  - selector: \"*\"\n    allow_unregistered_calls: true\n  - selector: {PKG}.CreateShelf, {PKG}.DeleteShelf\n    allow_unregistered_calls: false\n\
backend:\n  rules:\n  - selector: endpoints.examples.bookstore.Bookstore.*\n    address: grpcs://books.example.com\n    deadline: 5\n\
authentication:\n  providers:\n  - id: p\n    issuer: https://issuer.example.com\n  rules:\n  - selector: \"*\"\n    requirements:\n    - provider_id: p\n\
quota:\n  metric_rules:\n  - selector: \"*\"\n    metric_costs:\n      read-requests: 1\n  - selector: {PKG}.CreateBook\n    metric_costs:\n      write-requests: \"5\"\n\
system_parameters:\n  rules:\n  - selector: {PKG}.ListShelves\n    parameters:\n    - name: api_key\n      http_header: x-bookstore-key\n"
    );
    let c = ok(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let svc = c.service;
    let usage = &svc.usage.as_ref().unwrap().rules;
    assert_eq!(usage.len(), 15);
    assert!(usage
        .iter()
        .all(|r| r.selector.starts_with(PKG) && !r.selector.contains('*')));
    for r in usage {
        let closed = r.selector.ends_with(".CreateShelf") || r.selector.ends_with(".DeleteShelf");
        assert_eq!(r.allow_unregistered_calls, !closed, "{}", r.selector);
    }
    let backend = &svc.backend.as_ref().unwrap().rules;
    assert_eq!(backend.len(), 15);
    assert!(backend
        .iter()
        .all(|r| r.address == "grpcs://books.example.com" && r.deadline == 5.0));
    assert_eq!(svc.authentication.as_ref().unwrap().rules.len(), 15);
    let quota = &svc.quota.as_ref().unwrap().metric_rules;
    assert_eq!(quota.len(), 15);
    let create = quota
        .iter()
        .find(|r| r.selector.ends_with(".CreateBook"))
        .unwrap();
    assert_eq!(create.metric_costs.get("write-requests"), Some(&5));
    assert!(!create.metric_costs.contains_key("read-requests"));
    let sp = &svc.system_parameters.as_ref().unwrap().rules;
    assert_eq!(sp.len(), 1);
    assert_eq!(sp[0].parameters[0].http_header, "x-bookstore-key");
}

#[test]
fn a_selector_matching_nothing_is_a_warning() {
    let text = format!(
        "{HEAD}usage:\n  rules:\n  - selector: {PKG}.Nope\n    allow_unregistered_calls: true\n  - selector: other.Api.*, {PKG}.GetBook\n    allow_unregistered_calls: true\n"
    );
    let c = ok(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    let w: Vec<String> = c.warnings.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        w,
        [
            format!("api_config.yaml:8:15: usage rule has selector(s) '{PKG}.Nope' that do not match and are not shadowed by other rules."),
            "api_config.yaml:10:15: usage rule has selector(s) 'other.Api.*' that do not match and are not shadowed by other rules.".to_string(),
        ]
    );
    assert_eq!(c.warnings[0].severity, Severity::Warning);
    assert_eq!(c.service.usage.unwrap().rules.len(), 1);
}

#[test]
fn bad_selector_syntax_is_an_error() {
    for bad in ["a..b", "*.Get", "a.*.b", "a b", "1a.B", "a.b*", ""] {
        let text = format!("{HEAD}usage:\n  rules:\n  - selector: \"{bad}\"\n");
        let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
        let want = if bad.is_empty() {
            "api_config.yaml:8:15: usage rule has no selector; use '*' for every method."
                .to_string()
        } else {
            format!("api_config.yaml:8:15: usage rule has bad syntax in selector '{bad}'.")
        };
        assert_eq!(e, [want], "{bad:?}");
    }
}

#[test]
fn an_api_missing_from_the_descriptor_cannot_be_resolved() {
    let text = "type: google.api.Service\nconfig_version: 3\nname: s.example.com\napis:\n- name: endpoints.examples.bookstore.Bookstore\n- name: endpoints.examples.bookstore.Library\n";
    let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", text)]);
    assert_eq!(
        e,
        ["api_config.yaml:6:9: Cannot resolve api 'endpoints.examples.bookstore.Library'. The descriptor set defines: endpoints.examples.bookstore.Bookstore."]
    );
    // Without any descriptor set.
    let e = errors(&[yaml("api_config.yaml", text)]);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].ends_with("Cannot resolve api 'endpoints.examples.bookstore.Bookstore'. The submission has no descriptor set with services (FILE_DESCRIPTOR_SET_PROTO)."), "{e:?}");
}

#[test]
fn unknown_fields_are_reported_with_positions_all_at_once() {
    let text = format!(
        "{HEAD}foo: 1\nusage:\n  rules:\n  - selector: \"*\"\n    allow: true\nhttp:\n  rules:\n  - selector: \"*\"\n    get: /x\n    additional_bindings:\n    - gett: /y\n"
    );
    let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    assert_eq!(
        e,
        [
            "api_config.yaml:6:1: Found field 'foo' which is unknown in 'google.api.Service'.",
            "api_config.yaml:10:5: Found field 'allow' which is unknown in 'google.api.UsageRule'.",
            "api_config.yaml:16:7: Found field 'gett' which is unknown in 'google.api.HttpRule'.",
        ]
    );
}

#[test]
fn lower_camel_keys_are_accepted_but_not_both_spellings() {
    let text = format!(
        "type: google.api.Service\nconfigVersion: 3\nname: s.example.com\napis:\n- name: {PKG}\nusage:\n  rules:\n  - selector: {PKG}.GetShelf\n    allowUnregisteredCalls: true\n"
    );
    let svc = ok(&[set(bookstore_set()), yaml("api_config.yaml", &text)]).service;
    assert!(svc.usage.unwrap().rules[0].allow_unregistered_calls);
    let text = format!(
        "{HEAD}usage:\n  rules:\n  - selector: {PKG}.GetShelf\n    allowUnregisteredCalls: true\n    allow_unregistered_calls: false\n"
    );
    let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    assert_eq!(
        e,
        ["api_config.yaml:10:5: Field 'allow_unregistered_calls' of 'google.api.UsageRule' is given twice (as 'allow_unregistered_calls' and 'allowUnregisteredCalls'); give it once."]
    );
}

#[test]
fn wrong_value_types_are_errors() {
    let text = format!(
        "{HEAD}usage:\n  rules:\n    selector: x\nbackend:\n  rules:\n  - selector: \"*\"\n    deadline: soon\n    disable_auth: yes\n"
    );
    let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    assert_eq!(
        e,
        [
            "api_config.yaml:8:5: Field 'rules' of 'google.api.Usage' must be a list, not a mapping.",
            "api_config.yaml:12:15: Field 'deadline' of 'google.api.BackendRule' must be a number, not a string.",
            "api_config.yaml:13:19: Field 'disable_auth' of 'google.api.BackendRule' must be true or false, not a string.",
        ]
    );
}

#[test]
fn type_and_config_version_are_checked() {
    let body = format!("name: s.example.com\napis:\n- name: {PKG}\n");
    let e = errors(&[
        set(bookstore_set()),
        yaml("a.yaml", &format!("config_version: 3\n{body}")),
    ]);
    assert_eq!(
        e,
        ["a.yaml:1:1: Expected a field 'type' specifying the configuration type name in root object."]
    );
    let e = errors(&[
        set(bookstore_set()),
        yaml(
            "a.yaml",
            &format!("type: google.api.Other\nconfig_version: 3\n{body}"),
        ),
    ]);
    assert_eq!(
        e,
        ["a.yaml:1:7: The specified configuration type 'google.api.Other' is unknown; a gRPC service config has type: google.api.Service."]
    );
    let e = errors(&[
        set(bookstore_set()),
        yaml("a.yaml", &format!("type: google.api.Service\n{body}")),
    ]);
    assert_eq!(
        e,
        ["a.yaml: config_version is not specified in the service config file."]
    );
    let c = ok(&[
        set(bookstore_set()),
        yaml(
            "a.yaml",
            &format!("type: google.api.Service\nconfig_version: 2\n{body}"),
        ),
    ]);
    assert_eq!(
        c.warnings.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        ["a.yaml:2:17: config_version 2 is not the current version 3; the file is read as version 3."]
    );
    assert_eq!(c.service.config_version, 3);
    let e = errors(&[set(bookstore_set()), yaml("a.yaml", "- a\n- b\n")]);
    assert_eq!(
        e,
        ["a.yaml:1:1: The service config must be a mapping (a google.api.Service), not a list."]
    );
    let e = errors(&[
        set(bookstore_set()),
        yaml("a.yaml", "type: google.api.Service\nconfig_version: 3\n"),
    ]);
    assert_eq!(e, ["a.yaml:1:1: The service config has no 'name'; give the service's name, e.g. name: bookstore.endpoints.my-project.cloud.goog."]);
    let e = errors(&[set(bookstore_set()), yaml("a.yaml", "type: [unclosed\n")]);
    assert!(
        e[0].starts_with("a.yaml:") && e[0].contains("invalid YAML"),
        "{e:?}"
    );
    let e = errors(&[
        set(bookstore_set()),
        GrpcSource::new(
            FileType::ServiceConfigYaml,
            "a.yaml",
            vec![b'a', b':', 0xff],
        ),
    ]);
    assert_eq!(e, ["a.yaml:1:1: The file is not valid UTF-8 text."]);
}

#[test]
fn bad_http_rules_in_yaml_name_the_file_line_and_method() {
    let text = format!(
        "{HEAD}http:\n  rules:\n  - selector: {PKG}.GetShelf\n    get: /v1//shelves\n  - selector: {PKG}.CreateShelf\n    post: /v1/shelves\n    body: theme\n  - selector: {PKG}.GetBook\n    get: /v1/shelves/{{shelf}}/books/{{book.id}}\n  - selector: {PKG}.ListBooks\n  - selector: {PKG}.DeleteBook\n    delete: /v1/x\n    additional_bindings:\n    - get: /v1/y\n      selector: z\n      additional_bindings:\n      - get: /v1/z\n  - selector: {PKG}.CreateBook\n    post: /v1/b\n    body: book.title\n    response_body: nope\n"
    );
    let e = errors(&[set(bookstore_set()), yaml("api_config_http.yaml", &text)]);
    assert_eq!(
        e,
        [
            format!("api_config_http.yaml:9:10: http rule for '{PKG}.GetShelf': the path template \"/v1//shelves\" is not valid: segment 2 is empty (\"//\"); empty path segments are not allowed."),
            format!("api_config_http.yaml:11:11: http rule for '{PKG}.CreateShelf': body field 'theme' is not a field of the request message 'endpoints.examples.bookstore.CreateShelfRequest'."),
            format!("api_config_http.yaml:14:10: http rule for '{PKG}.GetBook': variable 'book.id' in path template \"/v1/shelves/{{shelf}}/books/{{book.id}}\" goes through 'book' of 'endpoints.examples.bookstore.GetBookRequest', which is not a message."),
            format!("api_config_http.yaml:15:15: http rule for '{PKG}.ListBooks': the rule has no pattern; set one of get, put, post, delete, patch or custom."),
            format!("api_config_http.yaml:17:13: http rule for '{PKG}.DeleteBook': rules in additional_bindings must not specify additional_bindings."),
            format!("api_config_http.yaml:17:13: http rule for '{PKG}.DeleteBook': rules in additional_bindings must not specify a selector."),
            format!("api_config_http.yaml:24:11: http rule for '{PKG}.CreateBook': body field path 'book.title' should not reference sub messages."),
            format!("api_config_http.yaml:24:11: http rule for '{PKG}.CreateBook': response_body field 'nope' is not a field of the response message 'endpoints.examples.bookstore.Book'."),
        ]
    );
}

const BAD_ANNOTATION: &str = r#"syntax = "proto3";
package demo.v2;
import "google/api/annotations.proto";
service Echo {
  rpc Say(Msg) returns (Msg) { option (google.api.http) = { get: "/v2/say/{missing}" }; }
  rpc Shout(Msg) returns (Msg) { option (google.api.http) = { post: "v2/shout" body: "*" }; }
  rpc Fine(Msg) returns (Msg) { option (google.api.http) = { get: "/v2/fine/{text}" }; }
}
message Msg { string text = 1; }
"#;

#[test]
fn bad_annotations_name_the_descriptor_file_and_method() {
    let bytes = compile(&[("demo.proto", BAD_ANNOTATION)], &["demo.proto"], true);
    let text = "type: google.api.Service\nconfig_version: 3\nname: s.example.com\napis:\n- name: demo.v2.Echo\n";
    let e = errors(&[set(bytes.clone()), yaml("api_config.yaml", text)]);
    assert_eq!(
        e,
        [
            "api_descriptor.pb: Method 'demo.v2.Echo.Say', option google.api.http: variable 'missing' in path template \"/v2/say/{missing}\" does not name a field: 'demo.v2.Msg' has no field 'missing'.",
            "api_descriptor.pb: Method 'demo.v2.Echo.Shout', option google.api.http: the path template \"v2/shout\" is not valid: a path template must start with \"/\".",
        ]
    );
    // A YAML rule replaces a bad annotation; the version comes from the package.
    let fixed = format!(
        "{text}http:\n  rules:\n  - selector: demo.v2.Echo.Say\n    get: /v2/say/{{text}}\n  - selector: demo.v2.Echo.Shout\n    post: /v2/shout\n    body: \"*\"\n"
    );
    let svc = ok(&[set(bytes), yaml("api_config.yaml", &fixed)]).service;
    assert_eq!(svc.apis[0].version, "v2");
    assert_eq!(svc.http.unwrap().rules.len(), 3);
}

#[test]
fn broken_descriptor_sets_are_errors_naming_the_file() {
    let good = bookstore_set();
    let cfg = yaml("api_config.yaml", &example("api_config.yaml"));
    for (bytes, want) in [
        (Vec::new(), "the file is empty"),
        (
            vec![0xff, 0xff, 0xff],
            "it is not a protobuf-encoded google.protobuf.FileDescriptorSet",
        ),
        (
            good[..good.len() / 2].to_vec(),
            "it is not a protobuf-encoded google.protobuf.FileDescriptorSet",
        ),
        (
            b"syntax = \"proto3\";".to_vec(),
            "The descriptor set cannot be used: ",
        ),
    ] {
        let e = errors(&[set(bytes), cfg.clone()]);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("api_descriptor.pb: The descriptor set cannot be used: "),
            "{e:?}"
        );
        assert!(e[0].contains(want), "{e:?}");
        assert!(e[0].ends_with("Build it with protoc --include_imports --include_source_info --descriptor_set_out=FILE."), "{e:?}");
    }
    // Built without --include_imports: the missing import is named.
    let alone = compile(&[], &["bookstore.proto"], false);
    let e = errors(&[set(alone), cfg]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("google/api/annotations.proto"), "{e:?}");
}

#[test]
fn the_http_option_is_read_without_the_extension_definition() {
    // A set that does not define google.api.http but carries field 72295728 in the method
    // options (an encoded HttpRule: get = "/v1/shelves").
    let legacy = r#"syntax = "proto3";
package legacy;
import "google/protobuf/descriptor.proto";
extend google.protobuf.MethodOptions { bytes raw_http = 72295728; }
service Shelves {
  rpc List(Req) returns (Req) { option (legacy.raw_http) = "\x12\x0b/v1/shelves\x3a\x01*"; }
  rpc Plain(Req) returns (Req);
}
message Req { string q = 1; }
"#;
    let bytes = compile(&[("legacy.proto", legacy)], &["legacy.proto"], true);
    let text = "type: google.api.Service\nconfig_version: 3\nname: s.example.com\napis:\n- name: legacy.Shelves\n";
    let svc = ok(&[set(bytes), yaml("api_config.yaml", text)]).service;
    let rules = svc.http.unwrap().rules;
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].selector, "legacy.Shelves.List");
    assert_eq!(rules[0].get.as_deref(), Some("/v1/shelves"));
    assert_eq!(rules[0].body, "*");
}

#[test]
fn an_http_extension_of_the_wrong_type_is_an_error() {
    let wrong = r#"syntax = "proto3";
package google.api;
import "google/protobuf/descriptor.proto";
extend google.protobuf.MethodOptions { string http = 72295728; }
service S { rpc M(R) returns (R) { option (google.api.http) = "/x"; } }
message R {}
"#;
    let bytes = compile(&[("wrong/http.proto", wrong)], &["wrong/http.proto"], true);
    let text = "type: google.api.Service\nconfig_version: 3\nname: s.example.com\napis:\n- name: google.api.S\n";
    let e = errors(&[set(bytes), yaml("api_config.yaml", text)]);
    assert_eq!(
        e,
        ["api_descriptor.pb: Method 'google.api.S.M': the descriptor set declares google.api.http as string, not google.api.HttpRule."]
    );
}

#[test]
fn proto_files_need_a_descriptor_set_and_are_kept_for_display() {
    let proto = GrpcSource::new(
        FileType::ProtoFile,
        "bookstore.proto",
        example("bookstore.proto"),
    );
    let cfg = yaml(
        "api_config.yaml",
        "type: google.api.Service\nconfig_version: 3\nname: s.example.com\n",
    );
    let e = errors(&[cfg.clone(), proto.clone()]);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("bookstore.proto: A PROTO_FILE is kept for display only"),
        "{e:?}"
    );
    let svc = ok(&[set(bookstore_set()), cfg, proto]).service;
    let files = svc.source_info.unwrap().source_files;
    assert_eq!(files[2]["fileType"], "PROTO_FILE");
    assert_eq!(files[2]["filePath"], "bookstore.proto");
}

#[test]
fn a_service_config_yaml_is_required() {
    let e = errors(&[set(bookstore_set())]);
    assert_eq!(
        e,
        ["a gRPC service needs a SERVICE_CONFIG_YAML file (api_config.yaml, with type: google.api.Service) that names the service and its APIs"]
    );
}

#[test]
fn backend_and_quota_values_are_range_checked_with_positions() {
    let text = format!(
        "{HEAD}backend:\n  rules:\n  - selector: \"*\"\n    deadline: 1e300\n    protocol: h3\nquota:\n  metric_rules:\n  - selector: \"*\"\n    metric_costs:\n      r: -1\n"
    );
    let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(
        e[0].starts_with("api_config.yaml:9:15: backend rule deadline 1e300 is out of range"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("api_config.yaml:10:15: backend rule protocol \"h3\" is not supported"),
        "{e:?}"
    );
    assert!(
        e[2].starts_with(
            "api_config.yaml:15:7: quota rule: the cost -1 of metric 'r' is out of range"
        ),
        "{e:?}"
    );
}

#[test]
fn the_bookstore_auth_sample_expands_its_rules() {
    let c = ok(&[
        set(bookstore_set()),
        yaml("api_config_auth.yaml", &example("api_config_auth.yaml")),
    ]);
    let svc = c.service;
    let auth = svc.authentication.unwrap();
    assert_eq!(auth.providers.len(), 1);
    assert_eq!(auth.providers[0].id, "bookstore_sa");
    assert_eq!(auth.rules.len(), 15);
    assert!(auth
        .rules
        .iter()
        .all(|r| r.requirements[0].provider_id == "bookstore_sa"));
    assert!(svc
        .usage
        .unwrap()
        .rules
        .iter()
        .all(|r| r.allow_unregistered_calls));
}

#[test]
fn a_cancelled_conversion_stops() {
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let opts = ConvertOptions {
        deadline: None,
        cancel: Some(cancel),
    };
    let e = convert_with(
        &[
            set(bookstore_set()),
            yaml("api_config.yaml", &example("api_config.yaml")),
        ],
        &opts,
    )
    .unwrap_err();
    assert_eq!(e.interrupted, Some(Interrupted::Cancelled));
}

#[test]
fn file_types_round_trip_their_names() {
    for t in [
        FileType::ServiceConfigYaml,
        FileType::FileDescriptorSetProto,
        FileType::ProtoFile,
    ] {
        assert_eq!(FileType::from_name(t.as_str()), Some(t));
    }
    assert_eq!(FileType::from_name("OPEN_API_YAML"), None);
}

#[test]
fn long_selectors_and_names_are_not_echoed_whole() {
    let long = format!("{}..x", "a".repeat(1 << 20));
    let text = format!("{HEAD}- name: {long}\n");
    let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    assert_eq!(e.len(), 1, "{}", e.len());
    assert!(e[0].len() < 400, "{}", e[0].len());
    assert!(
        e[0].contains("Cannot resolve api 'aaaa") && e[0].contains("...'."),
        "{}",
        &e[0][..200]
    );
    let text = format!("{HEAD}usage:\n  rules:\n  - selector: \"{long}\"\n");
    let e = errors(&[set(bookstore_set()), yaml("api_config.yaml", &text)]);
    assert_eq!(e.len(), 1);
    assert!(e[0].len() < 300, "{}", e[0].len());
    assert!(e[0].ends_with("...'."), "{}", &e[0][..200]);
}
