//! A real multi-host run: four network namespaces on a private bridge (10.77.0.0/24), one
//! `slug node --listen` per namespace, a 4-stage tcp pipeline coordinated from the root
//! namespace, tokens compared with the single-process run. Needs root and `ip`; otherwise it
//! says why it skipped. Everything it creates is torn down by a guard, even on failure.

#[path = "support/netns.rs"]
mod netns;

use netns::{Testbed, skip_reason};
use slug_kernels::ModelConfig;
use slug_transport::auth::ClusterKey;
use slug_transport::pipeline::{NoObservers, PipelineConfig, prompt_tokens, run};
use slug_transport::transfer::TransportKind;

const NODES: usize = 4;
const SUBNET: &str = "10.77.0";

fn config() -> PipelineConfig {
    let mut model = ModelConfig::preset("tiny").expect("tiny preset");
    model.layers = 4;
    model.seed = 5;
    let mut cfg = PipelineConfig::new(model, "x", 1, 8);
    cfg.prompts = ["four hosts", "one pipeline"]
        .iter()
        .map(|p| prompt_tokens(p))
        .collect();
    cfg.stages = NODES;
    cfg.timeout_ms = 20_000;
    cfg
}

#[test]
fn four_namespaces_run_the_same_tokens_as_one_process() {
    if let Some(why) = skip_reason(SUBNET) {
        eprintln!("netns test skipped: {why}");
        return;
    }
    let mut bed = Testbed::new("sl", SUBNET, NODES);
    let addrs = match bed.build() {
        Ok(a) => a,
        Err(e) => {
            // Containers may allow root but not namespaces or bridges: say so and stop.
            eprintln!("netns test skipped: cannot build the test network: {e}");
            return;
        }
    };
    let key = ClusterKey::random().expect("cluster key");
    let hosts: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| bed.start_node(i, a, &key, None).expect("node"))
        .collect();
    let single = run(&config(), &NoObservers).expect("single-process run");
    let mut cfg = config();
    cfg.transport = TransportKind::Tcp;
    cfg.hosts = hosts.clone();
    cfg.digests = true;
    // The coordinator reads the key from a file, as `slug run --hosts` does.
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("cluster.key");
    std::fs::write(&key_file, key.as_env_value()).expect("write key file");
    // Key files must be private: a node refuses one other users can read.
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod key file");
    cfg.key_file = Some(key_file);
    let distributed = run(&cfg, &NoObservers).expect("four-namespace run");
    assert_eq!(distributed.tokens, single.tokens);
    for (r, host) in distributed.stage_reports.iter().zip(&hosts) {
        assert_eq!(
            &r.host, host,
            "stage {} ran on its namespace's node",
            r.stage
        );
        assert!(r.clock.is_some());
    }
    assert_eq!(distributed.digests().len(), 2 * (8 * 3 + 7));
}
