//! Template validation by the apiserver: a server-side dry run (`dryRun=All`) of creating a
//! pod built from an AgentPool's template, once per template (by AgentPool uid and template
//! hash), so a template the apiserver would refuse is found when the pool is applied, not when
//! its first pod is created.
//!
//! Only the apiserver's verdict on the pod itself counts: 422 (invalid, the message names the
//! field) and 400 (undecodable, e.g. a quantity that is not one) refuse the template. Anything
//! else (a quota exhausted now, an admission webhook without dry-run support, the apiserver
//! unreachable) says nothing about the template: it is not cached, and the pool is applied
//! (its pod creations report such errors as before). Writes nothing.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use super::{KubeBackend, build_pod, template_hash};
use crate::backend::ProvisionRequest;
use crate::k8s::crd::AgentPool;

impl KubeBackend {
    /// Why the apiserver refuses a pod built from `ap`'s template (None: it accepts it, or it
    /// could not say). Asks once per template; needs a valid spec otherwise.
    pub async fn check_template(&self, key: &str, ap: &AgentPool) -> Option<String> {
        if ap.spec.pool.external {
            return None;
        }
        let (uid, hash) = (ap.uid().unwrap_or_default(), template_hash(ap));
        if let Some(v) = self.verdicts.get(key)
            && v.0 == uid
            && v.1 == hash
        {
            return v.2.clone();
        }
        let req = ProvisionRequest {
            pool: key.to_string(),
            agent: format!("{}-dry-run", ap.name_any()),
            token: "dry-run".into(),
            spec: ap.spec.pool.clone(),
        };
        let mut pod = match build_pod(ap, &req, &self.cfg.hub_url) {
            Ok(p) => p,
            // The spec's own problems (no container...) are reported by the controller.
            Err(_) => return None,
        };
        pod.metadata.generate_name = Some(format!("{}-dry-run-", ap.name_any()));
        pod.metadata.name = None;
        let ns = ap.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let verdict = match api.create(&pp, &pod).await {
            Ok(_) => None,
            Err(kube::Error::Api(s))
                if s.code == 422
                    || (s.code == 400 && !s.message.to_lowercase().contains("dry run")) =>
            {
                Some(format!(
                    "spec.template: the apiserver refuses a pod built from it (server-side dry run): {}",
                    s.message
                ))
            }
            Err(e) => {
                tracing::warn!(pool = %key, namespace = %ns, error = %e,
                    "dry run of the pod template failed; not judging the template");
                return None;
            }
        };
        self.verdicts
            .insert(key.to_string(), (uid, hash, verdict.clone()));
        verdict
    }

    /// What [`check_template`](Self::check_template) found for `ap`'s template, if it asked.
    pub fn template_problem(&self, key: &str, ap: &AgentPool) -> Option<String> {
        let v = self.verdicts.get(key)?;
        (v.0 == ap.uid().unwrap_or_default() && v.1 == template_hash(ap))
            .then(|| v.2.clone())
            .flatten()
    }
}
