//! The gateway path `buildctl build` takes (reference §5.2): `Control.Solve`
//! with neither frontend nor definition registers a job under its ref; the
//! client then drives the frontend through `LLBBridge` calls carrying
//! `buildkit-controlapi-buildid: <ref>` — `Ping`, `Solve`, `Return` — and
//! `Control.Solve` exports what `Return` handed back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_image::oci::{ImageConfig, Platform};
use kiln_proto::moby::buildkit::v1::apicaps::ApiCap;
use kiln_proto::moby::buildkit::v1::frontend::llb_bridge_server::LlbBridge;
use kiln_proto::moby::buildkit::v1::frontend::{
    self as gw, result::Result as ResultKind, PingRequest, PongResponse, ReturnRequest,
    ReturnResponse,
};
use kiln_solver::{ProgressWriter, SolveResult};
use tokio::sync::{oneshot, Notify};
use tonic::{Request, Response, Status};

use crate::control::{Built, ControlService, PlatformSolved};
use crate::policy::SourcePolicy;

/// The metadata key naming the build an `LLBBridge` call belongs to.
pub const BUILD_ID_HEADER: &str = "buildkit-controlapi-buildid";

/// How long an `LLBBridge` call waits for its build to be registered.
const REGISTER_WAIT: Duration = Duration::from_secs(3);

/// Frontend API capabilities kiln serves (the rest are absent, so clients
/// fall back or fail clearly).
const FRONTEND_CAPS: &[&str] = &[
    "solve.base",
    "solve.inlinereturn",
    "return",
    "gateway.solve.metadata",
];

/// A solved result held until `Return` names it.
struct Solved {
    platform: Platform,
    result: SolveResult,
    config: ImageConfig,
}

/// One gateway build.
pub struct Job {
    build_ref: String,
    session: String,
    progress: ProgressWriter,
    entitlements: Vec<String>,
    /// The source policy of the `Control.Solve` that started the job.
    policy: Option<Arc<SourcePolicy>>,
    results: Mutex<HashMap<String, Solved>>,
    returned: Mutex<Option<oneshot::Sender<Result<gw::Result, Status>>>>,
}

impl Job {
    /// A job for `build_ref`, and the receiver of what `Return` hands back.
    pub fn new(
        build_ref: String,
        session: String,
        progress: ProgressWriter,
        entitlements: Vec<String>,
        policy: Option<Arc<SourcePolicy>>,
    ) -> (Arc<Self>, oneshot::Receiver<Result<gw::Result, Status>>) {
        let (tx, rx) = oneshot::channel();
        let job = Arc::new(Self {
            build_ref,
            session,
            progress,
            entitlements,
            policy,
            results: Mutex::new(HashMap::new()),
            returned: Mutex::new(Some(tx)),
        });
        (job, rx)
    }

    /// The solved results the returned result names: one ref (an empty result is scratch),
    /// or BuildKit's multi-platform shape — a `refs` map keyed by platform id with the
    /// `refs.platforms` metadata listing them. The frontend's `containerimage.config`
    /// (`containerimage.config/<platform id>`) metadata wins over the config recorded at solve
    /// time.
    pub fn take_result(&self, returned: gw::Result) -> Result<Built, Status> {
        let config_of = |key: &str, solved: Solved| -> Result<PlatformSolved, Status> {
            let image_config = match returned.metadata.get(key) {
                Some(bytes) => serde_json::from_slice(bytes)
                    .map_err(|e| Status::invalid_argument(format!("invalid {key}: {e}")))?,
                None => solved.config,
            };
            Ok(PlatformSolved {
                platform: solved.platform,
                result: solved.result,
                image_config,
                definition: None,
            })
        };
        let refs = match &returned.result {
            Some(ResultKind::Ref(r)) => {
                let solved = self.take(&r.id)?;
                let one = config_of(CONFIG_KEY, solved)?;
                return Ok(Built::single(one.result, one.image_config));
            }
            Some(ResultKind::RefDeprecated(id)) => {
                let solved = self.take(id)?;
                let one = config_of(CONFIG_KEY, solved)?;
                return Ok(Built::single(one.result, one.image_config));
            }
            None => {
                let solved = self.take("")?;
                let one = config_of(CONFIG_KEY, solved)?;
                return Ok(Built::single(one.result, one.image_config));
            }
            Some(ResultKind::Refs(map)) => map
                .refs
                .iter()
                .map(|(k, r)| (k.clone(), r.id.clone()))
                .collect::<BTreeMap<_, _>>(),
            Some(ResultKind::RefsDeprecated(map)) => map.refs.clone(),
        };
        let listed: ResultPlatforms = match returned.metadata.get(PLATFORMS_KEY) {
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| Status::invalid_argument(format!("invalid {PLATFORMS_KEY}: {e}")))?,
            None => {
                return Err(Status::invalid_argument(format!(
                    "a result with several refs needs the {PLATFORMS_KEY} metadata naming their platforms"
                )))
            }
        };
        if listed.platforms.len() != refs.len() {
            return Err(Status::invalid_argument(format!(
                "{PLATFORMS_KEY} lists {} platforms for {} refs",
                listed.platforms.len(),
                refs.len()
            )));
        }
        let mut platforms = Vec::with_capacity(refs.len());
        for entry in listed.platforms {
            let id = refs.get(&entry.id).ok_or_else(|| {
                Status::invalid_argument(format!("no ref for platform {:?}", entry.id))
            })?;
            let mut solved = self.take(id)?;
            solved.platform = entry.platform.canonical();
            platforms.push(config_of(&format!("{CONFIG_KEY}/{}", entry.id), solved)?);
        }
        Ok(Built {
            platforms,
            multi_platform: true,
        })
    }

    fn take(&self, id: &str) -> Result<Solved, Status> {
        self.results
            .lock()
            .map_err(|_| Status::internal("gateway results poisoned"))?
            .remove(id)
            .ok_or_else(|| Status::invalid_argument(format!("unknown result reference {id:?}")))
    }
}

/// The metadata key of an image config (`/<platform id>` appended per platform).
const CONFIG_KEY: &str = "containerimage.config";
/// The metadata key listing a multi-platform result's platforms (BuildKit's `exptypes`).
const PLATFORMS_KEY: &str = "refs.platforms";

/// The `refs.platforms` metadata: `{"Platforms":[{"ID":"linux/arm64","Platform":{…}}]}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResultPlatforms {
    #[serde(rename = "Platforms")]
    platforms: Vec<ResultPlatform>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResultPlatform {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Platform")]
    platform: Platform,
}

/// Gateway jobs by ref.
#[derive(Default, Clone)]
pub struct Gateways {
    jobs: Arc<Mutex<HashMap<String, Arc<Job>>>>,
    registered: Arc<Notify>,
}

/// Removes a job when its `Control.Solve` ends (or is cancelled).
pub struct Registration {
    gateways: Gateways,
    build_ref: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.gateways.jobs.lock() {
            jobs.remove(&self.build_ref);
        }
    }
}

impl Gateways {
    /// Registers `job` until the returned guard drops.
    pub fn register(&self, job: Arc<Job>) -> Registration {
        let build_ref = job.build_ref.clone();
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(build_ref.clone(), job);
        }
        self.registered.notify_waiters();
        Registration {
            gateways: self.clone(),
            build_ref,
        }
    }

    /// The job a call belongs to, waiting briefly for it to be registered.
    async fn job<T>(&self, request: &Request<T>) -> Result<Arc<Job>, Status> {
        let build_ref = request
            .metadata()
            .get(BUILD_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::invalid_argument("no buildid found in context"))?
            .to_string();
        let deadline = tokio::time::Instant::now() + REGISTER_WAIT;
        loop {
            let notified = self.registered.notified();
            if let Some(job) = self
                .jobs
                .lock()
                .ok()
                .and_then(|j| j.get(&build_ref).cloned())
            {
                return Ok(job);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::not_found(format!("no such job {build_ref}")));
            }
        }
    }
}

/// `moby.buildkit.v1.frontend.LLBBridge`, backed by the control service.
pub struct GatewayService {
    control: Arc<ControlService>,
}

impl GatewayService {
    /// The bridge of `control`.
    pub fn new(control: Arc<ControlService>) -> Self {
        Self { control }
    }
}

#[tonic::async_trait]
impl LlbBridge for GatewayService {
    async fn solve(
        &self,
        request: Request<gw::SolveRequest>,
    ) -> Result<Response<gw::SolveResponse>, Status> {
        let job = self.control.gateways.job(&request).await?;
        let request = request.into_inner();
        if request.r#final {
            return Err(Status::unimplemented(
                "the legacy final solve is not supported: kilnd advertises the return capability",
            ));
        }
        let attrs: BTreeMap<String, String> = request.frontend_opt.clone();
        let auth = self.control.registry_auth(&job.session);
        let build = self.control.build(
            &request.frontend,
            request.definition.clone(),
            &attrs,
            &job.session,
            &job.entitlements,
            &job.progress,
            &job.build_ref,
            job.policy.clone(),
        );
        let built = kiln_image::registry::auth::scope(auth, build).await?;
        let mut results = job
            .results
            .lock()
            .map_err(|_| Status::internal("gateway results poisoned"))?;
        let mut metadata = BTreeMap::new();
        let result = if built.multi_platform {
            // BuildKit's multi-platform result: refs by platform id, their configs under
            // `containerimage.config/<id>`, and `refs.platforms` listing them in order.
            if !request.allow_result_return {
                return Err(Status::unimplemented(
                    "a multi-platform result can only be returned inline (allowResultReturn)",
                ));
            }
            let mut refs = BTreeMap::new();
            let mut listed = Vec::new();
            for one in built.platforms {
                let platform_id = one.platform.id();
                let id = format!("{}-{}", job.build_ref, rand::random::<u64>());
                metadata.insert(
                    format!("{CONFIG_KEY}/{platform_id}"),
                    serde_json::to_vec(&one.image_config)
                        .map_err(|e| Status::internal(e.to_string()))?,
                );
                listed.push(ResultPlatform {
                    id: platform_id.clone(),
                    platform: one.platform.clone(),
                });
                refs.insert(
                    platform_id,
                    gw::Ref {
                        id: id.clone(),
                        def: None,
                    },
                );
                results.insert(
                    id,
                    Solved {
                        platform: one.platform,
                        result: one.result,
                        config: one.image_config,
                    },
                );
            }
            metadata.insert(
                PLATFORMS_KEY.to_string(),
                serde_json::to_vec(&ResultPlatforms { platforms: listed })
                    .map_err(|e| Status::internal(e.to_string()))?,
            );
            ResultKind::Refs(gw::RefMap { refs })
        } else {
            let one = built
                .platforms
                .into_iter()
                .next()
                .ok_or_else(|| Status::internal("the build returned no result"))?;
            let id = format!("{}-{}", job.build_ref, rand::random::<u64>());
            metadata.insert(
                CONFIG_KEY.to_string(),
                serde_json::to_vec(&one.image_config)
                    .map_err(|e| Status::internal(e.to_string()))?,
            );
            results.insert(
                id.clone(),
                Solved {
                    platform: one.platform,
                    result: one.result,
                    config: one.image_config,
                },
            );
            ResultKind::Ref(gw::Ref { id, def: None })
        };
        drop(results);
        let response = match result {
            ResultKind::Ref(r) if !request.allow_result_return => gw::SolveResponse {
                r#ref: r.id,
                result: None,
            },
            result => gw::SolveResponse {
                r#ref: String::new(),
                result: Some(gw::Result {
                    result: Some(result),
                    metadata,
                }),
            },
        };
        Ok(Response::new(response))
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PongResponse>, Status> {
        self.control.gateways.job(&request).await?;
        let cap = |id: &&str| ApiCap {
            id: id.to_string(),
            enabled: true,
            ..Default::default()
        };
        Ok(Response::new(PongResponse {
            frontend_api_caps: FRONTEND_CAPS.iter().map(cap).collect(),
            llb_caps: Vec::new(),
            workers: self.control.worker_records(),
        }))
    }

    async fn r#return(
        &self,
        request: Request<ReturnRequest>,
    ) -> Result<Response<ReturnResponse>, Status> {
        let job = self.control.gateways.job(&request).await?;
        let request = request.into_inner();
        let outcome = match request.error {
            Some(error) if error.code != 0 => {
                Err(Status::new(tonic::Code::from(error.code), error.message))
            }
            _ => Ok(request.result.unwrap_or_default()),
        };
        let sender = job
            .returned
            .lock()
            .map_err(|_| Status::internal("gateway job poisoned"))?
            .take()
            .ok_or_else(|| Status::failed_precondition("the build already returned"))?;
        let _ = sender.send(outcome);
        Ok(Response::new(ReturnResponse {}))
    }
}
