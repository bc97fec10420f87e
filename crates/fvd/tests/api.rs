//! The API against a real fvd process, without booting guests: registry, persistence
//! across fvd SIGKILL, refusals (409 with the state), admission control, routing,
//! and the committed OpenAPI document.
mod common;
use common::*;
use serde_json::json;

#[test]
fn committed_openapi_is_current() {
    let doc = serde_json::to_string_pretty(&fvd::api::openapi_document()).unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/openapi.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == doc,
        "{} is stale: regenerate it with `fvd --print-openapi > docs/api/openapi.json`",
        path.display()
    );
}

#[test]
fn every_operation_in_the_table_is_routed_and_served_openapi() {
    let f = Fvd::start();
    let doc = f.ok("GET", "/openapi.json", None);
    for op in fvd::api::OPERATIONS {
        let path = op
            .path
            .replace("{id}", "no-such-vm")
            .replace("{job}", "no-such-job")
            .replace("{disk}", "0")
            .replace("{nic}", "0");
        if op.name == "event.stream" || op.name == "host.shutdown" {
            continue; // streams forever / stops fvd; routed like the others
        }
        let (_, v) = f.req(&op.method.to_uppercase(), &path, None);
        assert_ne!(
            v["operation"], "api.route",
            "{} {} is not routed",
            op.method, op.path
        );
        assert_eq!(doc["paths"][op.path][op.method]["operationId"], op.name);
    }
    // Unknown endpoints get the error shape too.
    let (s, v) = f.req("GET", "/nope", None);
    assert_eq!(s, 404);
    assert_eq!(v["code"], "not_found");
}

#[test]
fn registry_survives_fvd_kill_and_config_is_a_file() {
    let mut f = Fvd::start();
    let v = f.new_vm(
        json!({"name": "reg", "generation": "1", "memory_mib": 128, "notes": "n1",
        "cpu": {"count": 1, "reserve_percent": 10, "limit_percent": 50, "weight": 200}}),
    );
    let id = v["id"].as_str().unwrap().to_string();
    let cfg_path = v["config_path"].as_str().unwrap().to_string();
    assert!(cfg_path.ends_with(&format!("{id}/{id}.json")), "{cfg_path}");
    let on_disk: fv_model::VmConfig =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(on_disk.cpu.weight, 200);
    assert_eq!(on_disk.generation, fv_model::Generation::Gen1);
    // Rename and notes are allowed in any state and change the file.
    f.ok(
        "PATCH",
        "/vms/reg",
        Some(json!({"name": "reg2", "notes": "n2"})),
    );
    let on_disk: fv_model::VmConfig =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(
        (on_disk.name.as_str(), on_disk.notes.as_str()),
        ("reg2", "n2")
    );
    let (s, _) = f.req("GET", "/vms/reg", None);
    assert_eq!(s, 404);
    f.restart_after_kill9();
    let v = f.vm("reg2");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["state"], "Off");
    assert_eq!(v["config"]["notes"], "n2");
    // Events were stored and are queryable with since= (newest first).
    let ev = f.ok("GET", "/events?since=0", None);
    let kinds: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"vm.created") && kinds.contains(&"vm.renamed"),
        "{kinds:?}"
    );
    let last = ev.as_array().unwrap().first().unwrap()["seq"]
        .as_i64()
        .unwrap();
    assert_eq!(
        f.ok("GET", &format!("/events?since={last}"), None),
        json!([])
    );
    // Remove unregisters but keeps files unless asked.
    let (s, _) = f.req("DELETE", &format!("/vms/{id}"), None);
    assert_eq!(s, 204);
    assert!(std::path::Path::new(&cfg_path).exists());
    assert_eq!(f.req("GET", &format!("/vms/{id}"), None).0, 404);
}

#[test]
fn invalid_transitions_are_409_with_the_state() {
    let f = Fvd::start();
    let v = f.new_vm(json!({"name": "t", "memory_mib": 64}));
    let id = v["id"].as_str().unwrap();
    for a in [
        "pause",
        "resume",
        "reset",
        "save",
        "stop",
        "discard-saved-state",
    ] {
        let (s, e) = f.req("POST", &format!("/vms/{id}/actions/{a}"), None);
        assert_eq!(s, 409, "{a}: {e}");
        assert_eq!(e["code"], "invalid_state", "{a}: {e}");
        assert_eq!(e["state"], "Off", "{a}: {e}");
        assert!(e["message"].as_str().unwrap().contains("Off"), "{e}");
        assert!(e["operation"].as_str().unwrap().starts_with("vm."), "{e}");
    }
    // Malformed bodies are 400 with the same shape.
    let (s, e) = f.req("POST", "/vms", Some(json!({"generation": "3"})));
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["operation"], "vm.create");
    // More vCPUs than the host has: refused at creation.
    let (s, e) = f.req(
        "POST",
        "/vms",
        Some(json!({"name": "big", "cpu": {"count": 4096}})),
    );
    assert_eq!(s, 400, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("logical processors"),
        "{e}"
    );
    // Missing disk files are refused.
    let (s, e) = f.req(
        "POST",
        &format!("/vms/{id}/disks"),
        Some(json!({"path": "/nonexistent/x.vhdx"})),
    );
    assert_eq!(s, 400, "{e}");
}

#[test]
fn duplicate_static_macs_are_refused() {
    let f = Fvd::start();
    f.new_vm(json!({"name": "m1", "network_adapters": [{"static_mac": "00:15:5d:aa:bb:01"}]}));
    let (s, e) = f.req(
        "POST",
        "/vms",
        Some(json!({"name": "m2", "network_adapters": [{"static_mac": "00-15-5D-AA-BB-01"}]})),
    );
    assert_eq!(s, 409, "{e}");
    assert!(e["message"].as_str().unwrap().contains("m1"), "{e}");
    let v = f.new_vm(json!({"name": "m3"}));
    let id = v["id"].as_str().unwrap();
    let (s, e) = f.req(
        "POST",
        &format!("/vms/{id}/nics"),
        Some(json!({"static_mac": "00:15:5d:aa:bb:01"})),
    );
    assert_eq!(s, 409, "{e}");
    let (s, e) = f.req(
        "POST",
        &format!("/vms/{id}/nics"),
        Some(json!({"static_mac": "01:00:00:00:00:01"})),
    );
    assert_eq!(s, 400, "multicast: {e}");
    let v = f.ok(
        "POST",
        &format!("/vms/{id}/nics"),
        Some(json!({"static_mac": "00:15:5d:aa:bb:02"})),
    );
    assert_eq!(
        v["config"]["network_adapters"][0]["static_mac"],
        "00:15:5D:AA:BB:02"
    );
}

#[test]
fn admission_refuses_memory_and_cpu_reserve_with_what_is_left() {
    let f = Fvd::start();
    let host = f.ok("GET", "/host", None);
    // As much as the host has (the most a VM may be given): more than is available.
    let total = host["memory_total_mib"].as_u64().unwrap();
    let v = f.new_vm(json!({"name": "huge", "memory_mib": total - total % 2}));
    let (s, e) = f.req(
        "POST",
        &format!("/vms/{}/actions/start", v["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["code"], "admission_refused");
    assert!(
        e["message"].as_str().unwrap().contains("MiB is available"),
        "{e}"
    );
    assert_eq!(f.vm("huge")["state"], "Off");

    // Keep 30% of one logical processor for VMs: a 1-vCPU VM reserving 40% cannot start.
    let cpus = host["logical_cpus"].as_u64().unwrap();
    let pool = 30 / cpus.max(1);
    f.ok(
        "PATCH",
        "/host",
        Some(json!({"cpu_reserve_pool_percent": pool})),
    );
    let v = f.new_vm(json!({"name": "res", "memory_mib": 64, "cpu": {"count": 1, "reserve_percent": 40, "limit_percent": 100, "weight": 100}}));
    let (s, e) = f.req(
        "POST",
        &format!("/vms/{}/actions/start", v["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["code"], "admission_refused");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("only {}% is left", cpus * pool)),
        "{msg}"
    );
    let (s, e) = f.req(
        "PATCH",
        "/host",
        Some(json!({"cpu_reserve_pool_percent": 101})),
    );
    assert_eq!(s, 400, "{e}");
}

#[test]
fn jobs_unknown_and_host_settings_persist() {
    let mut f = Fvd::start();
    let (s, e) = f.req("GET", "/jobs/00000000-0000-0000-0000-000000000000", None);
    assert_eq!((s, e["operation"].as_str()), (404, Some("job.view")));
    f.ok(
        "PATCH",
        "/host",
        Some(json!({"mac_pool_size": 3, "mac_pool_start": "00-15-5d-01-02-fe", "accel": "tcg"})),
    );
    f.restart_after_kill9();
    let h = f.ok("GET", "/host", None);
    assert_eq!(h["settings"]["mac_pool_size"], 3);
    assert_eq!(h["settings"]["mac_pool_start"], "00:15:5D:01:02:FE");
    assert_eq!(h["accel"], "tcg");
}

#[test]
fn auto_accel_is_tcg_on_pvm_hosts() {
    let f = Fvd::start();
    let h = f.ok("GET", "/host", None);
    if std::path::Path::new("/sys/module/kvm_pvm").exists()
        || !std::path::Path::new("/dev/kvm").exists()
    {
        assert_eq!(h["accel"], "tcg", "{h}");
    }
    assert!(!h["accel_reason"].as_str().unwrap().is_empty());
}

#[test]
fn events_stream_as_sse() {
    use std::io::{Read, Write};
    let f = Fvd::start();
    f.new_vm(json!({"name": "before"}));
    let mut s = std::os::unix::net::UnixStream::connect(&f.sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    s.write_all(b"GET /events/stream?since=0 HTTP/1.1\r\nHost: fvd\r\n\r\n")
        .unwrap();
    f.new_vm(json!({"name": "after"}));
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while got.matches("event: vm.created").count() < 2 {
        assert!(
            std::time::Instant::now() < end,
            "events missing from the stream: {got}"
        );
        let n = s.read(&mut buf).expect("SSE stream stalled");
        assert!(n > 0, "stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("text/event-stream"), "{got}");
    assert!(got.contains("before") && got.contains("after"), "{got}");
}
