//! Every WGSL variant the kernel launchers can produce parses and validates with naga, and
//! translates to the shading languages of the backends this code has never run on: MSL
//! (Metal), HLSL (DX12) and SPIR-V (Vulkan), within Metal's buffer limit.

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

/// naga capabilities of the features the adapter really has (what `Gpu::new` requests), as
/// wgpu grants them to shaders.
fn adapter_capabilities(
    features: wgpu::Features,
    downlevel: wgpu::DownlevelFlags,
) -> naga::valid::Capabilities {
    use naga::valid::Capabilities as C;
    let mut c = C::empty();
    if downlevel.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32) {
        c |= C::SHADER_FLOAT16_IN_FLOAT32;
    }
    if features.contains(wgpu::Features::SHADER_F16) {
        c |= C::SHADER_FLOAT16;
    }
    if features.contains(wgpu::Features::SUBGROUP) {
        c |= C::SUBGROUP;
    }
    c
}

/// Metal gives a stage 31 buffer slots and wgpu takes one for its buffer-sizes table.
const METAL_BUFFERS: usize = 30;

#[test]
fn every_kernel_variant_translates_to_msl_hlsl_and_spirv() {
    let gpu = stablerep::gpu::Gpu::new(&stablerep::gpu::GpuOptions::default()).expect("adapter");
    let features = gpu.device.features();
    let adapter = stablerep::gpu::adapter::choose(None).expect("adapter");
    let caps = adapter_capabilities(features, adapter.get_downlevel_capabilities().flags);
    let variants = catalog::all_variants().expect("catalog builds");
    let (mut failures, mut skipped, mut done) = (Vec::new(), 0, 0);
    for d in &variants {
        let src = d.source().expect("template renders");
        let module = naga::front::wgsl::parse_str(&src).expect("parses (checked above)");
        let info = match naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
        {
            Ok(i) => i,
            Err(e) => {
                // A variant needing a feature this adapter lacks is never launched here.
                let all = naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::all(),
                )
                .validate(&module);
                if all.is_ok() && caps != naga::valid::Capabilities::all() {
                    if std::env::var("SHOW_SKIPPED").is_ok() {
                        eprintln!("{}: {}", d.key, e.emit_to_string(&src));
                    }
                    skipped += 1;
                    continue;
                }
                failures.push(format!("{}: validate: {}", d.key, e.emit_to_string(&src)));
                continue;
            }
        };
        let buffers = module
            .global_variables
            .iter()
            .filter(|(_, v)| v.binding.is_some())
            .count();
        if buffers > METAL_BUFFERS {
            failures.push(format!(
                "{}: {buffers} bindings, Metal allows {METAL_BUFFERS}",
                d.key
            ));
        }
        let msl = naga::back::msl::Options {
            lang_version: (2, 4),
            ..Default::default()
        };
        if let Err(e) = naga::back::msl::write_string(
            &module,
            &info,
            &msl,
            &naga::back::msl::PipelineOptions::default(),
        ) {
            failures.push(format!("{}: MSL: {e}", d.key));
        }
        let hlsl = naga::back::hlsl::Options {
            shader_model: naga::back::hlsl::ShaderModel::V6_2,
            ..Default::default()
        };
        let pipeline = naga::back::hlsl::PipelineOptions::default();
        let mut out = String::new();
        if let Err(e) =
            naga::back::hlsl::Writer::new(&mut out, &hlsl, &pipeline).write(&module, &info, None)
        {
            failures.push(format!("{}: HLSL: {e}", d.key));
        }
        if let Err(e) =
            naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
        {
            failures.push(format!("{}: SPIR-V: {e}", d.key));
        }
        done += 1;
    }
    assert!(
        failures.is_empty(),
        "{} kernels do not translate:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        done > 60,
        "only {done} variants translated ({skipped} skipped)"
    );
    eprintln!("{done} variants translated to MSL, HLSL and SPIR-V; {skipped} need features this adapter lacks");
}

#[test]
fn only_f16_variants_need_shader_f16() {
    // A device without `shader-f16` (WebGL, some DX12 and Vulkan drivers) must still compile
    // every variant that stores no f16 value: the f16 storage variants' keys end in `_h`
    // and a digit per operand (matmuls: `_f16..c`, an f16 C), and the packed f16 operands
    // (`_f16a`/`_f16b`) need only core WGSL.
    let caps = naga::valid::Capabilities::all() - naga::valid::Capabilities::SHADER_FLOAT16;
    let (mut half, mut plain) = (0, 0);
    for d in &catalog::all_variants().expect("catalog builds") {
        let src = d.source().expect("template renders");
        let needs = d
            .key
            .rsplit_once("_h")
            .is_some_and(|(_, t)| !t.is_empty() && t.chars().all(|c| c == '0' || c == '1'))
            || d.key
                .rsplit_once("_f16")
                .is_some_and(|(_, t)| t.contains('c'));
        assert_eq!(
            src.starts_with("enable f16;"),
            needs,
            "{}: `enable f16;` must be there exactly for f16 storage",
            d.key
        );
        if needs {
            half += 1;
            continue;
        }
        plain += 1;
        let mut fe = naga::front::wgsl::Frontend::new_with_options(naga::front::wgsl::Options {
            parse_doc_comments: false,
            capabilities: caps,
        });
        let module = fe
            .parse(&src)
            .unwrap_or_else(|e| panic!("{} without shader-f16: {}", d.key, e.emit_to_string(&src)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{} without shader-f16: {}", d.key, e.emit_to_string(&src)));
    }
    assert!(
        half >= 8 && plain > 60,
        "{half} f16 and {plain} other variants"
    );
}
