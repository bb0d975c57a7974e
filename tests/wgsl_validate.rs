//! Every WGSL variant the kernel launchers can produce parses and validates with naga,
//! without a GPU.

use stablerep::kernels::catalog;

#[test]
fn every_kernel_variant_validates_with_naga() {
    let variants = catalog::all_variants().expect("catalog builds");
    assert!(
        variants.len() > 60,
        "catalog unexpectedly small: {}",
        variants.len()
    );
    let mut failures = Vec::new();
    for d in &variants {
        let src = d.source().expect("template renders");
        let module = match naga::front::wgsl::parse_str(&src) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{}: parse: {}", d.key, e.emit_to_string(&src)));
                continue;
            }
        };
        let mut v = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        );
        if let Err(e) = v.validate(&module) {
            failures.push(format!("{}: validate: {}", d.key, e.emit_to_string(&src)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} invalid kernels:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn unfilled_placeholders_are_an_error() {
    let err = stablerep::kernels::source::render("unary", &[]).unwrap_err();
    assert!(err.to_string().contains("placeholder"), "{err}");
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let stem = name.trim_end_matches(".wgsl");
        assert!(
            stablerep::kernels::source::TEMPLATES
                .iter()
                .any(|(n, _)| *n == stem),
            "shaders/{name} is not in kernels::source::TEMPLATES"
        );
    }
}
