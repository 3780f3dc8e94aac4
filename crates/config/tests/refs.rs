//! `$ref`s between the files of one submission (`gcloud endpoints services deploy api.yaml
//! common.yaml`, or `configs:submit` with several `ConfigFile`s): resolved against the other
//! files, every problem named with the referring file, its line and the missing target, and
//! bounded against loops and fan-out.

use portico_config::{convert, Severity, SourceFile};
use serde_json::Value;

fn fixture(name: &str) -> String {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/refs/");
    std::fs::read_to_string(format!("{p}{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn files(list: &[(&str, &str)]) -> Vec<SourceFile> {
    list.iter().map(|(p, t)| SourceFile::new(*p, *t)).collect()
}

/// The diagnostics (`file:line:col: message`) of a rejected submission, errors only.
fn errors(list: &[(&str, &str)]) -> Vec<String> {
    match convert(&files(list)) {
        Ok(_) => panic!(
            "accepted: {:?}",
            list.iter().map(|f| f.0).collect::<Vec<_>>()
        ),
        Err(e) => e.errors().map(ToString::to_string).collect(),
    }
}

/// The config without `sourceInfo` (which holds the files themselves).
fn config_without_sources(list: &[(&str, &str)]) -> Value {
    let conv = convert(&files(list)).unwrap_or_else(|e| panic!("{e}"));
    let mut v = serde_json::to_value(&conv.service).expect("json");
    v.as_object_mut().expect("object").remove("sourceInfo");
    v
}

const HEAD: &str = "swagger: \"2.0\"\ninfo: {title: T, version: 1.0.0}\nhost: api.example.com\n";

/// An API whose only operation takes `param` (lines 1-4 are [`HEAD`] and `paths:`).
fn api_with_param(param: &str) -> String {
    format!("{HEAD}paths:\n  /a/{{id}}:\n    get:\n      operationId: a\n      parameters:\n        - $ref: \"{param}\"\n      responses: {{200: {{description: ok}}}}\n")
}

const ID_PARAM: &str = "parameters:\n  id: {name: id, in: path, required: true, type: string}\n";

#[test]
fn a_split_api_converts_exactly_like_the_same_api_in_one_file() {
    let (api, common, books) = (
        fixture("api.yaml"),
        fixture("common.yaml"),
        fixture("books.yaml"),
    );
    let split = config_without_sources(&[
        ("api.yaml", &api),
        ("common.yaml", &common),
        ("books.yaml", &books),
    ]);
    let inline = config_without_sources(&[("api.yaml", &fixture("inline.yaml"))]);
    assert_eq!(split, inline);
    // What the references carried: the path parameter of a path item in another file, a query
    // parameter through a chain of two $refs, the operations of books.yaml.
    let rules = split["http"]["rules"].as_array().expect("rules");
    let paths: Vec<(&str, &str)> = rules
        .iter()
        .map(|r| {
            let sel = r["selector"].as_str().unwrap_or_default();
            let path = ["get", "post"]
                .iter()
                .find_map(|m| r[*m].as_str())
                .unwrap_or_default();
            (sel.rsplit('.').next().unwrap_or_default(), path)
        })
        .collect();
    assert_eq!(
        paths,
        [
            ("ListShelves", "/shelves"),
            ("CreateShelf", "/shelves"),
            ("GetShelf", "/shelves/{shelf_id}"),
            ("ListBooks", "/shelves/{shelf_id}/books"),
            ("CreateBook", "/shelves/{shelf_id}/books"),
        ]
    );
    let list_books = split["types"]
        .as_array()
        .expect("types")
        .iter()
        .find(|t| t["name"] == "namespace.types.ListBooksRequest")
        .expect("ListBooksRequest");
    let fields: Vec<(&str, &str)> = list_books["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .map(|f| (f["jsonName"].as_str().unwrap(), f["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        fields,
        [
            ("shelfId", "TYPE_INT64"),
            ("pageSize", "TYPE_INT32"),
            ("author", "TYPE_STRING")
        ]
    );
    // The shared files are kept with the config's sources, but are not APIs of their own.
    let conv = convert(&files(&[
        ("api.yaml", &api),
        ("common.yaml", &common),
        ("books.yaml", &books),
    ]))
    .expect("converts");
    assert_eq!(conv.service.apis.len(), 1);
    let sources = &conv.service.source_info.expect("sources").source_files;
    let names: Vec<&str> = sources
        .iter()
        .map(|f| f["filePath"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["api.yaml", "common.yaml", "books.yaml"]);
}

#[test]
fn the_order_of_the_files_does_not_matter() {
    let (api, common, books) = (
        fixture("api.yaml"),
        fixture("common.yaml"),
        fixture("books.yaml"),
    );
    let a = config_without_sources(&[
        ("api.yaml", &api),
        ("common.yaml", &common),
        ("books.yaml", &books),
    ]);
    let b = config_without_sources(&[
        ("books.yaml", &books),
        ("common.yaml", &common),
        ("api.yaml", &api),
    ]);
    assert_eq!(a, b);
}

/// gcloud sends only files with `swagger` and `host`: a shared file sent through gcloud has
/// them, and no paths. It is still only a file of definitions, not a second API.
#[test]
fn a_shared_file_with_swagger_and_host_for_gcloud_is_not_an_api() {
    let common = format!("swagger: \"2.0\"\nhost: api.example.com\n{ID_PARAM}");
    let conv = convert(&files(&[
        ("api.yaml", &api_with_param("./common.yaml#/parameters/id")),
        ("common.yaml", &common),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conv.service.apis.len(), 1);
    assert_eq!(conv.service.apis[0].methods.len(), 1);
    // Without a reference to it, it is an API and must be a complete one.
    let e = errors(&[
        ("api.yaml", &api_with_param("#/parameters/id")),
        ("common.yaml", &common),
    ]);
    assert!(
        e.iter()
            .any(|l| l.starts_with("common.yaml:1:1: missing required field \"info\"")),
        "{e:?}"
    );
}

#[test]
fn a_file_nobody_refers_to_must_be_an_openapi_file() {
    let api = format!("{HEAD}paths: {{}}\n");
    assert_eq!(
        errors(&[("api.yaml", &api), ("common.yaml", ID_PARAM)]),
        ["common.yaml:1:1: missing required field \"swagger\": an OpenAPI 2.0 file must declare swagger: \"2.0\"; a file that only holds definitions for the others must be named by a $ref in one of them"]
    );
    // Files that only refer to each other have nothing to convert.
    let a = "x: {$ref: './b.yaml'}\n";
    let b = "y: {$ref: './a.yaml'}\n";
    assert_eq!(errors(&[("a.yaml", a), ("b.yaml", b)]).len(), 2);
}

/// The baseline of api-compiler's distributed_swagger_missing_file, with the other files sent:
/// only the one that is really missing is named.
#[test]
fn a_missing_file_is_named_with_the_referring_file_and_line() {
    let api = format!("{HEAD}paths:\n  /a/{{id}}:\n    get:\n      operationId: a\n      parameters:\n        - $ref: \"./common.yaml#/parameters/id\"\n      responses:\n        200:\n          description: ok\n          schema: {{$ref: './missing.json#/Thing'}}\n");
    assert_eq!(
        errors(&[("api.yaml", &api), ("common.yaml", ID_PARAM)]),
        ["api.yaml:13:26: reference \"./missing.json#/Thing\" cannot be resolved: the submission has no file \"missing.json\" (its files: api.yaml, common.yaml); add the file to the deployment"]
    );
    // In a shared file, reported under its own name and line.
    let common = "parameters:\n  id: {$ref: './gone.yaml#/id'}\n";
    assert_eq!(
        errors(&[("api.yaml", &api_with_param("./common.yaml#/parameters/id")), ("common.yaml", common)]),
        ["common.yaml:2:14: reference \"./gone.yaml#/id\" cannot be resolved: the submission has no file \"gone.yaml\" (its files: api.yaml, common.yaml); add the file to the deployment"]
    );
}

#[test]
fn a_missing_target_is_named_with_where_it_was_looked_for() {
    let cases = [
        (
            "./common.yaml#/parameters/nope",
            "api.yaml:9:17: reference \"./common.yaml#/parameters/nope\" cannot be resolved: common.yaml has no \"nope\" under \"/parameters\"",
        ),
        (
            "./common.yaml#/params/id",
            "api.yaml:9:17: reference \"./common.yaml#/params/id\" cannot be resolved: common.yaml has no \"params\" at its top level",
        ),
        (
            "./common.yaml#/parameters/id/name/x",
            "api.yaml:9:17: reference \"./common.yaml#/parameters/id/name/x\" cannot be resolved: common.yaml has a string under \"/parameters/id/name\", not a mapping or list to look up \"x\" in",
        ),
        (
            "./common.yaml#/list/7",
            "api.yaml:9:17: reference \"./common.yaml#/list/7\" cannot be resolved: common.yaml has no item \"7\" in the list of 2 under \"/list\"",
        ),
    ];
    let common = format!("{ID_PARAM}list: [a, b]\n");
    for (r, expected) in cases {
        let e = errors(&[("api.yaml", &api_with_param(r)), ("common.yaml", &common)]);
        assert_eq!(e[0], expected, "{r}");
    }
    // JSON pointer escapes and list indexes.
    let common = "params:\n  a/b~c:\n    - {name: id, in: path, required: true, type: string}\n";
    convert(&files(&[
        (
            "api.yaml",
            &api_with_param("./common.yaml#/params/a~1b~0c/0"),
        ),
        ("common.yaml", common),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Google's converter builds definitions on demand: a missing target inside `definitions` is a
/// warning. A missing file is an error wherever it is (Google's parser fails to load it).
#[test]
fn inside_definitions_a_missing_target_is_a_warning_and_a_missing_file_an_error() {
    let api = format!(
        "{HEAD}paths: {{}}\ndefinitions:\n  A: {{$ref: './common.yaml#/definitions/Nope'}}\n"
    );
    let common = "definitions:\n  B: {type: string}\n";
    let conv = convert(&files(&[("api.yaml", &api), ("common.yaml", common)]))
        .unwrap_or_else(|e| panic!("{e}"));
    let warnings: Vec<String> = conv.warnings.iter().map(ToString::to_string).collect();
    assert!(
        warnings.contains(&"api.yaml:6:13: reference \"./common.yaml#/definitions/Nope\" cannot be resolved: common.yaml has no \"Nope\" under \"/definitions\"".to_string()),
        "{warnings:?}"
    );
    let api = format!("{api}  C: {{$ref: './other.yaml#/definitions/B'}}\n");
    let e = errors(&[("api.yaml", &api), ("common.yaml", common)]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("api.yaml:7:13: reference \"./other.yaml#/definitions/B\" cannot be resolved: the submission has no file \"other.yaml\""), "{e:?}");
}

/// References that cannot name a file of the submission are refused, each for its reason.
#[test]
fn urls_absolute_paths_and_parent_directories_are_refused() {
    let url = "is a URL; only files of the same submission can be referred to (Portico fetches nothing): add the file to the deployment and refer to it by its relative path, e.g. \"./common.yaml\"";
    let abs = "is an absolute path; refer to a file of the submission by its path relative to this file, e.g. \"./common.yaml\"";
    let up = "goes up a directory (\"..\"); refer to files of the submission without \"..\", e.g. \"./common.yaml\" for a file next to this one";
    let backslash = "uses \"\\\" in its path; separate directories with \"/\"";
    for (r, why) in [
        ("https://example.com/common.yaml#/parameters/id", url),
        ("http://169.254.169.254/computeMetadata/v1/", url),
        ("file:///etc/passwd", url),
        ("HTTPS://EXAMPLE.COM/x.yaml", url),
        ("/etc/passwd", abs),
        ("//example.com/common.yaml", abs),
        ("C:\\\\specs\\\\common.yaml", abs),
        ("../common.yaml#/parameters/id", up),
        ("./sub/../../common.yaml", up),
        ("./sub/../common.yaml", up),
        ("%2e%2e/common.yaml", up),
        ("sub\\\\common.yaml", backslash),
        ("sub%5ccommon.yaml", backslash),
    ] {
        let e = errors(&[("api.yaml", &api_with_param(r)), ("common.yaml", ID_PARAM)]);
        let shown = r.replace("\\\\", "\\");
        assert_eq!(
            e[0],
            format!("api.yaml:9:17: reference \"{shown}\" {why}"),
            "{r}"
        );
    }
    for (r, message) in [
        ("", "reference is empty; write \"#/definitions/Name\", or \"./file.yaml#/Name\" for another file of the submission".to_string()),
        ("./common.yaml#parameters/id", "reference \"./common.yaml#parameters/id\": the part after \"#\" must be a JSON pointer starting with \"/\" (\"./common.yaml#/parameters/id\")".to_string()),
        ("./", "reference \"./\" names a directory, not a file".to_string()),
        ("%ff.yaml", "reference \"%ff.yaml\" has %-escapes that do not spell UTF-8 text".to_string()),
        ("#parameters/id", "reference \"#parameters/id\" must begin with \"#/definitions/\", \"#/parameters/\" or \"#/responses/\"".to_string()),
    ] {
        let e = errors(&[("api.yaml", &api_with_param(r)), ("common.yaml", ID_PARAM)]);
        assert_eq!(e[0], format!("api.yaml:9:17: {message}"), "{r:?}");
    }
}

/// How a reference finds its file: relative to the referring file's path, `.` segments and
/// %-escapes resolved, names compared exactly; a near miss says what is there.
#[test]
fn files_are_found_relative_to_the_referring_file() {
    // From v1/api.yaml, "common.yaml" is v1/common.yaml, and so is "./x/../common.yaml".
    for (r, common_path) in [
        ("common.yaml#/parameters/id", "v1/common.yaml"),
        ("./common.yaml#/parameters/id", "./v1/./common.yaml"),
        ("shared/common.yaml#/parameters/id", "v1/shared/common.yaml"),
        ("my%20common.yaml#/parameters/id", "v1/my common.yaml"),
    ] {
        convert(&files(&[
            ("v1/api.yaml", &api_with_param(r)),
            (common_path, ID_PARAM),
        ]))
        .unwrap_or_else(|e| panic!("{r} → {common_path}: {e}"));
    }
    let case = errors(&[
        ("api.yaml", &api_with_param("./Common.yaml#/parameters/id")),
        ("common.yaml", ID_PARAM),
    ]);
    assert_eq!(case[0], "api.yaml:9:17: reference \"./Common.yaml#/parameters/id\" cannot be resolved: the submission has no file \"Common.yaml\" (\"common.yaml\" differs only in case; names are compared exactly)");
    // gcloud flattens directories: a reference into one names the base name.
    let flat = errors(&[
        (
            "api.yaml",
            &api_with_param("./shared/common.yaml#/parameters/id"),
        ),
        ("common.yaml", ID_PARAM),
    ]);
    assert_eq!(flat[0], "api.yaml:9:17: reference \"./shared/common.yaml#/parameters/id\" cannot be resolved: the submission has no file \"shared/common.yaml\" (\"common.yaml\" has that name, but references are resolved against the referring file's path \"api.yaml\"; gcloud sends every file under its base name, so refer to it as \"./common.yaml\")");
    // A bare name is not a definition of this file.
    let bare = errors(&[
        ("api.yaml", &api_with_param("id")),
        ("common.yaml", ID_PARAM),
    ]);
    assert_eq!(bare[0], "api.yaml:9:17: reference \"id\" cannot be resolved: the submission has no file \"id\"; to refer to a part of this file, write \"#/definitions/id\", \"#/parameters/id\" or \"#/responses/id\"");
    // Two files under one name: a reference cannot tell them apart.
    let twice = errors(&[
        ("api.yaml", &api_with_param("./common.yaml#/parameters/id")),
        ("common.yaml", ID_PARAM),
        ("./common.yaml", ID_PARAM),
    ]);
    assert_eq!(twice[0], "api.yaml:9:17: reference \"./common.yaml#/parameters/id\" is ambiguous: 2 files of the submission are named \"common.yaml\"");
}

/// A shared file's own `#/...` references are to itself, and an OpenAPI file can be the target
/// of another's references (any JSON pointer into it).
#[test]
fn references_inside_a_shared_file_are_relative_to_it() {
    let common = "parameters:\n  id: {$ref: '#/real'}\nreal: {name: id, in: path, required: true, type: string}\n";
    convert(&files(&[
        ("api.yaml", &api_with_param("./common.yaml#/parameters/id")),
        ("common.yaml", common),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    // v2 takes v1's parameter.
    let v1 = format!("{}{ID_PARAM}", api_with_param("#/parameters/id"));
    let v2 = api_with_param("./v1.yaml#/parameters/id").replace("1.0.0", "2.0.0");
    let conv =
        convert(&files(&[("v1.yaml", &v1), ("v2.yaml", &v2)])).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conv.service.apis.len(), 2);
}

/// Problems inside a path item taken from another file are reported under that file's name.
#[test]
fn problems_in_a_path_item_from_another_file_name_that_file() {
    let api = format!("{HEAD}paths:\n  /books/{{id}}:\n    $ref: './books.yaml'\n    get: {{operationId: ignored}}\n");
    let books = "get:\n  operationId: getBook\n  parameters:\n    - {name: id, in: path, required: true, type: string}\npost:\n  operationId: addBook\n";
    let err = convert(&files(&[("api.yaml", &api), ("books.yaml", books)])).unwrap_err();
    let all: Vec<String> = err.diagnostics.iter().map(ToString::to_string).collect();
    assert!(
        all.contains(&"api.yaml:7:5: path \"/books/{id}\": \"get\" next to $ref is ignored; the path item is the one the $ref names".to_string()),
        "{all:?}"
    );
    let responses = "missing required field \"responses\" (OpenAPI 2.0 requires at least one, e.g. responses: {200: {description: OK}})";
    assert_eq!(
        err.errors().map(ToString::to_string).collect::<Vec<_>>(),
        [
            format!("books.yaml:1:1: Operation 'get' in path '/books/{{id}}': {responses}"),
            format!("books.yaml:5:1: Operation 'post' in path '/books/{{id}}': {responses}"),
            "books.yaml:5:1: Operation 'post' in path '/books/{id}': path parameter \"id\" is not declared; add a parameter with name: id and in: path".to_string(),
        ]
    );
    // A path item $ref that leads to no path item.
    let api = format!("{HEAD}paths:\n  /a:\n    $ref: './books.yaml#/get/operationId'\n");
    assert_eq!(
        errors(&[("api.yaml", &api), ("books.yaml", books)]),
        ["api.yaml:6:11: path \"/a\": $ref leads to a string, not a path item (a mapping of HTTP methods to operations)"]
    );
}

#[test]
fn reference_loops_and_long_chains_are_errors() {
    // Parameters that name each other.
    let api = format!(
        "{}parameters:\n  p: {{$ref: './common.yaml#/q'}}\n",
        api_with_param("#/parameters/p")
    );
    let common = "q: {$ref: './api.yaml#/parameters/p'}\n";
    let e = errors(&[("api.yaml", &api), ("common.yaml", common)]);
    assert_eq!(
        e[0],
        "api.yaml:9:17: Operation 'get' in path '/a/{id}': the $refs loop (#/parameters/p → ./common.yaml#/q → ./api.yaml#/parameters/p → ./common.yaml#/q)"
    );
    // A chain longer than 32 links.
    let mut api = format!("{}parameters:\n", api_with_param("#/parameters/p0"));
    for i in 0..40 {
        api.push_str(&format!("  p{i}: {{$ref: '#/parameters/p{}'}}\n", i + 1));
    }
    api.push_str("  p40: {name: id, in: path, required: true, type: string}\n");
    let e = errors(&[("api.yaml", &api)]);
    assert!(
        e[0].starts_with("api.yaml:9:17: Operation 'get' in path '/a/{id}': more than 32 $refs in a row (#/parameters/p0 → #/parameters/p1 → "),
        "{e:?}"
    );
    assert!(
        e[0].ends_with(" → #/parameters/p32); refer to the target directly"),
        "{e:?}"
    );
    // 32 in a row (the one at the parameter's place and 31 more) are followed.
    let api = api.replace("#/parameters/p0\"", "#/parameters/p9\"");
    convert(&files(&[("api.yaml", &api)])).unwrap_or_else(|e| panic!("{e}"));
    // Path items that name each other.
    let api = format!("{HEAD}paths:\n  /a:\n    $ref: './b.yaml'\n");
    let b = "$ref: './c.yaml'\n";
    let c = "$ref: './b.yaml'\n";
    let e = errors(&[("api.yaml", &api), ("b.yaml", b), ("c.yaml", c)]);
    assert_eq!(
        e,
        ["api.yaml:6:5: path \"/a\": the $refs loop (./b.yaml → ./c.yaml → ./b.yaml → ./c.yaml)"]
    );
    // Schemas that only alias each other across files describe nothing.
    let api = format!(
        "{}definitions:\n  A: {{$ref: './common.yaml#/B'}}\n",
        api_with_param("#/parameters/id").replace("#/parameters/id", "./common.yaml#/id")
    );
    let common = "B:\n  type: array\n  items: {$ref: './api.yaml#/definitions/A'}\nid: {name: id, in: path, required: true, type: string}\n";
    assert_eq!(
        errors(&[("api.yaml", &api), ("common.yaml", common)]),
        ["api.yaml:12:3: definition \"A\" refers back to itself only through $ref or array items (A → ./common.yaml#/B → A), so no value can have this type"]
    );
    // Schemas that refer to each other through properties are fine (a tree, a linked list).
    let common = "B:\n  type: object\n  properties:\n    next: {$ref: './api.yaml#/definitions/A'}\nid: {name: id, in: path, required: true, type: string}\n";
    convert(&files(&[("api.yaml", &api), ("common.yaml", common)]))
        .unwrap_or_else(|e| panic!("{e}"));
    // A loop among shared schemas only: reported once, in its file.
    let api = format!("{HEAD}paths: {{}}\ndefinitions:\n  A: {{$ref: './common.yaml#/B'}}\n  A2: {{$ref: './common.yaml#/C'}}\n");
    let common = "B: {$ref: '#/C'}\nC: {$ref: '#/B'}\n";
    assert_eq!(
        errors(&[("api.yaml", &api), ("common.yaml", common)]),
        ["common.yaml:1:5: this schema refers back to itself only through $ref or array items (./common.yaml#/B → #/C → ./common.yaml#/B), so no value can have this type"]
    );
}

/// A shared schema reached from many places is checked once: its broken reference is one
/// error, not one per use.
#[test]
fn a_shared_part_is_checked_once() {
    let mut api = format!("{HEAD}paths:\n");
    for i in 0..2000 {
        api.push_str(&format!("  /p{i}:\n    get:\n      operationId: op{i}\n      responses:\n        200:\n          description: ok\n          schema: {{$ref: './common.yaml#/Thing'}}\n"));
    }
    let common = "Thing:\n  type: object\n  properties:\n    part: {$ref: '#/Missing'}\n";
    let e = errors(&[("api.yaml", &api), ("common.yaml", common)]);
    assert_eq!(
        e,
        ["common.yaml:4:18: reference \"#/Missing\" cannot be resolved: common.yaml has no \"Missing\" at its top level"]
    );
}

/// 20,000 paths pointing at one large path item would be 20,000 copies of it: refused once the
/// copies pass the budget, at the reference that crosses it.
#[test]
fn path_items_pulled_in_by_ref_are_bounded() {
    // No operationId: each copy gets a method of its own, named after its path.
    let mut item = String::from("get:\n  responses: {200: {description: ok}}\n  parameters:\n");
    for i in 0..500 {
        item.push_str(&format!("    - {{name: q{i}, in: query, type: string}}\n"));
    }
    let mut api = format!("{HEAD}x-google-allow: configured\npaths:\n");
    for i in 0..20_000 {
        api.push_str(&format!("  /p{i}: {{$ref: './item.yaml'}}\n"));
    }
    let err = convert(&files(&[("api.yaml", &api), ("item.yaml", &item)])).unwrap_err();
    // 2,006 nodes per copy: 498 copies fit in 1,000,000; the 499th path (line 504) is refused,
    // once, and the rest are not looked at.
    assert_eq!(
        err.errors().map(ToString::to_string).collect::<Vec<_>>(),
        ["api.yaml:504:17: path \"/p498\": the path items brought in by $ref add more than 1000000 nodes to this submission; write fewer paths against large shared path items"]
    );
    // Within the budget one item serves many paths.
    let mut api = format!("{HEAD}paths:\n");
    for i in 0..100 {
        api.push_str(&format!("  /p{i}: {{$ref: './item.yaml'}}\n"));
    }
    let conv = convert(&files(&[("api.yaml", &api), ("item.yaml", &item)]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conv.service.apis[0].methods.len(), 100);
    assert_eq!(
        conv.service.types[99]["fields"].as_array().map(Vec::len),
        Some(500)
    );
}

/// Hostile pointers: long, deep, full of escapes. Each is one error, found quickly.
#[test]
fn hostile_pointers_are_single_errors() {
    let long = format!("./common.yaml#{}", "/a".repeat(200_000));
    let deep_common = format!("a: {}x{}\n", "{a: ".repeat(100), "}".repeat(100));
    let deep = format!("./common.yaml#{}", "/a".repeat(150));
    let escapes = format!("./common.yaml#/{}", "~0~1".repeat(50_000));
    for (r, common) in [
        (&long, ID_PARAM),
        (&deep, deep_common.as_str()),
        (&escapes, ID_PARAM),
    ] {
        let e = errors(&[("api.yaml", &api_with_param(r)), ("common.yaml", common)]);
        assert!(
            e[0].starts_with("api.yaml:9:17: reference \"./common.yaml#/"),
            "{}",
            &e[0][..200.min(e[0].len())]
        );
        assert!(
            e[0].contains("cannot be resolved: common.yaml has"),
            "{}",
            &e[0][..200.min(e[0].len())]
        );
    }
    // A pointer into a mapping of 50,000 entries, 50,000 times: hash lookups.
    let mut common = String::from("parameters:\n");
    for i in 0..50_000 {
        common.push_str(&format!(
            "  p{i}: {{name: p{i}, in: query, type: string}}\n"
        ));
    }
    let mut api = format!("{HEAD}paths:\n  /a:\n    get:\n      operationId: a\n      responses: {{200: {{description: ok}}}}\n      parameters:\n");
    for i in 0..50_000 {
        api.push_str(&format!(
            "        - $ref: './common.yaml#/parameters/p{i}'\n"
        ));
    }
    let conv = convert(&files(&[("api.yaml", &api), ("common.yaml", &common)]))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        conv.service.types[0]["fields"].as_array().map(Vec::len),
        Some(50_000)
    );
    assert!(conv
        .warnings
        .iter()
        .all(|w| w.severity == Severity::Warning));
}
