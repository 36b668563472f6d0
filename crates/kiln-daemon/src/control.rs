//! `moby.buildkit.v1.Control`: workers, sessions, progress and builds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kiln_image::oci::{ImageConfig, Platform};
use kiln_proto::moby::buildkit::v1 as api;
use kiln_proto::moby::buildkit::v1::control_server::Control;
use kiln_proto::moby::buildkit::v1::types::{BuildkitVersion, GcPolicy, WorkerRecord};
use kiln_proto::pb;
use kiln_session::SessionManager;
use kiln_solver::{ProgressWriter, SolveOptions, Solver};
use tonic::{Request, Response, Status};

use crate::exporter::{self, ExporterKind};
use crate::frontend::{self, DockerfileError, UserError};
use crate::jobs::{Jobs, StatusStream};
use crate::locals::{SessionLocals, SESSION_WAIT};
use crate::policy::SourcePolicy;

/// The daemon's state shared by every request.
pub struct ControlService {
    solver: Arc<Solver>,
    sessions: SessionManager,
    jobs: Jobs,
    pub(crate) gateways: crate::gateway::Gateways,
    root: PathBuf,
    entitlements: Vec<String>,
    gc_policy: Vec<GcPolicy>,
    /// Caches imported for a build (`--cache-from`), by build ref, for the
    /// solve that build runs (directly or through the gateway).
    cache_imports: std::sync::Mutex<std::collections::HashMap<String, kiln_solver::CacheImports>>,
}

/// Checks that every privileged step of `definition` is allowed both by the
/// daemon (`allowed`) and by the client's request (`requested`), as BuildKit
/// does: `RUN --security=insecure` needs `security.insecure`, `RUN
/// --network=host` needs `network.host`.
pub fn check_entitlements(
    definition: &pb::Definition,
    allowed: &[String],
    requested: &[String],
) -> Result<(), Status> {
    use prost::Message as _;
    for bytes in &definition.def {
        let Ok(op) = pb::Op::decode(bytes.as_slice()) else {
            continue;
        };
        let Some(pb::op::Op::Exec(exec)) = &op.op else {
            continue;
        };
        let mut needed = Vec::new();
        if exec.security == pb::SecurityMode::Insecure as i32 {
            needed.push("security.insecure");
        }
        if exec.network == pb::NetMode::Host as i32 {
            needed.push("network.host");
        }
        for entitlement in needed {
            if !allowed.iter().any(|a| a == entitlement) {
                return Err(Status::permission_denied(format!(
                    "{entitlement} is not allowed: start kilnd with --allow-insecure-entitlement {entitlement}"
                )));
            }
            if !requested.iter().any(|r| r == entitlement) {
                return Err(Status::permission_denied(format!(
                    "{entitlement} is not allowed: the build must ask for it (kiln build --allow {entitlement})"
                )));
            }
        }
    }
    Ok(())
}

impl ControlService {
    /// A service over `solver`, keeping transient files under `root`.
    pub fn new(solver: Arc<Solver>, sessions: SessionManager, root: PathBuf) -> Self {
        Self {
            solver,
            sessions,
            jobs: Jobs::default(),
            gateways: crate::gateway::Gateways::default(),
            root,
            entitlements: Vec::new(),
            gc_policy: Vec::new(),
            cache_imports: Default::default(),
        }
    }

    /// The garbage-collection policy the worker record reports.
    pub fn with_gc_policy(mut self, policy: Vec<GcPolicy>) -> Self {
        self.gc_policy = policy;
        self
    }

    /// Allows the insecure entitlements the daemon was started with
    /// (`--allow-insecure-entitlement`).
    pub fn with_entitlements(mut self, entitlements: Vec<String>) -> Self {
        self.entitlements = entitlements;
        self
    }

    fn version() -> BuildkitVersion {
        BuildkitVersion {
            package: "kiln".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: String::new(),
        }
    }

    fn worker_record(&self) -> WorkerRecord {
        let worker = self.solver.worker();
        WorkerRecord {
            id: worker.id().to_string(),
            labels: worker.labels().into_iter().collect(),
            platforms: worker.platforms().iter().map(to_pb_platform).collect(),
            gc_policy: self.gc_policy.clone(),
            buildkit_version: Some(Self::version()),
            cdi_devices: Vec::new(),
        }
    }
}

fn to_pb_platform(p: &Platform) -> pb::Platform {
    pb::Platform {
        architecture: p.architecture.clone(),
        os: p.os.clone(),
        variant: p.variant.clone().unwrap_or_default(),
        os_version: p.os_version.clone().unwrap_or_default(),
        os_features: p.os_features.clone().unwrap_or_default(),
    }
}

/// A failing step's place, as the `errdefs.Source` detail BuildKit attaches: the
/// instruction's lines.
fn step_excerpt(location: &kiln_solver::SourceRange) -> kiln_llb::errdefs::Excerpt {
    kiln_llb::errdefs::Excerpt {
        filename: location.filename.clone(),
        data: location.data.clone(),
        start_line: location.start_line as usize,
        end_line: location.end_line as usize,
        column: None,
    }
}

/// A status with BuildKit's typed details: the message is the cause alone, as buildkitd
/// sends it (clients add `failed to solve:`), and the excerpt travels as `errdefs.Source`.
fn status_with_excerpt(
    code: tonic::Code,
    message: String,
    excerpt: Option<kiln_llb::errdefs::Excerpt>,
) -> Status {
    match excerpt {
        None => Status::new(code, message),
        Some(excerpt) => {
            let details =
                kiln_llb::errdefs::status_details(code as i32, &message, vec![excerpt.to_detail()]);
            Status::with_details(code, message, details.into())
        }
    }
}

fn solve_error(e: &kiln_solver::Error) -> Status {
    let code = match e.root() {
        kiln_solver::Error::Definition(_) | kiln_solver::Error::InvalidSource { .. } => {
            tonic::Code::InvalidArgument
        }
        kiln_solver::Error::Unsupported { .. } => tonic::Code::Unimplemented,
        _ => tonic::Code::Unknown,
    };
    status_with_excerpt(code, error_chain(e), e.location().map(step_excerpt))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn anyhow_status(e: anyhow::Error) -> Status {
    if let Some(rejected) = e.downcast_ref::<DockerfileError>() {
        return status_with_excerpt(
            tonic::Code::InvalidArgument,
            rejected.message.clone(),
            Some(rejected.excerpt.clone()),
        );
    }
    let message = format!("{e:#}");
    if e.downcast_ref::<UserError>().is_some() {
        Status::invalid_argument(message)
    } else {
        Status::unknown(message)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A solved build: one result per target platform.
pub(crate) struct Built {
    /// The results, in the order the platforms were asked for.
    pub platforms: Vec<PlatformSolved>,
    /// A multi-platform result (BuildKit's `refs` map), exported as an index or one directory
    /// per platform; otherwise exactly one platform.
    pub multi_platform: bool,
}

/// The solved result of one target platform.
pub(crate) struct PlatformSolved {
    /// The target platform (canonical).
    pub platform: Platform,
    /// The solved result.
    pub result: kiln_solver::SolveResult,
    /// Its image config.
    pub image_config: ImageConfig,
    /// The definition that was solved (after the source policy); `None` when a gateway
    /// frontend solved it (provenance needs it for its materials).
    pub definition: Option<pb::Definition>,
}

impl Built {
    /// A single-platform result; its platform is read from the image config.
    pub(crate) fn single(result: kiln_solver::SolveResult, image_config: ImageConfig) -> Self {
        let platform = if image_config.os.is_empty() || image_config.architecture.is_empty() {
            Platform::host()
        } else {
            Platform::new(
                &image_config.os,
                &image_config.architecture,
                image_config.variant.as_deref(),
            )
        };
        Self {
            platforms: vec![PlatformSolved {
                platform: platform.canonical(),
                result,
                image_config,
                definition: None,
            }],
            multi_platform: false,
        }
    }
}

impl ControlService {
    /// Runs a frontend (`dockerfile.v0`) or a raw definition to solved
    /// results (one per target platform) and their image configs — what both
    /// `Control.Solve` and the gateway's `LLBBridge.Solve` do.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn build(
        &self,
        frontend: &str,
        definition: Option<pb::Definition>,
        attrs: &BTreeMap<String, String>,
        session_id: &str,
        entitlements: &[String],
        progress: &ProgressWriter,
        build_ref: &str,
        policy: Option<Arc<SourcePolicy>>,
    ) -> Result<Built, Status> {
        let worker = self.solver.worker().clone();
        let tmp_root = self.root.join("tmp");
        let (builds, multi_platform) = match (frontend, definition) {
            ("dockerfile.v0", _) => {
                if session_id.is_empty() {
                    return Err(Status::invalid_argument(
                        "the dockerfile.v0 frontend needs a session to read the Dockerfile",
                    ));
                }
                let session = self
                    .sessions
                    .get(session_id, SESSION_WAIT)
                    .await
                    .map_err(|e| {
                        Status::failed_precondition(format!("session {session_id}: {e}"))
                    })?;
                let result = frontend::dockerfile(
                    worker.clone(),
                    &session,
                    attrs,
                    progress,
                    build_ref,
                    &tmp_root,
                    policy.clone(),
                )
                .await
                .map_err(anyhow_status)?;
                (result.platforms, result.multi_platform)
            }
            ("", Some(definition)) => {
                let host = Platform::host().canonical();
                let config = ImageConfig {
                    architecture: host.architecture.clone(),
                    os: host.os.clone(),
                    ..Default::default()
                };
                let build = frontend::PlatformBuild {
                    platform: host,
                    definition,
                    image_config: config,
                };
                (vec![build], false)
            }
            ("", None) => {
                return Err(Status::invalid_argument(
                    "nothing to build: no frontend and no definition",
                ))
            }
            (other, _) => return Err(Status::not_found(format!("frontend {other:?} not found"))),
        };
        let locals = Arc::new(SessionLocals::new(
            self.sessions.clone(),
            session_id.to_string(),
            &self.root.join("locals"),
        ));
        let cache_imports = self
            .cache_imports
            .lock()
            .map(|m| m.get(build_ref).cloned().unwrap_or_default())
            .unwrap_or_default();
        let options = SolveOptions {
            no_cache: crate::frontend::no_cache_all(attrs),
            cache_imports,
            session: Some(Arc::new(crate::secrets::SessionSecrets::new(
                self.sessions.clone(),
                session_id.to_string(),
            ))),
        };
        let mut definitions = Vec::with_capacity(builds.len());
        for build in &builds {
            let definition = match &policy {
                Some(policy) => policy
                    .apply(&build.definition)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?,
                None => build.definition.clone(),
            };
            check_entitlements(&definition, &self.entitlements, entitlements)?;
            definitions.push(definition);
        }
        // The platforms solve concurrently; steps they share (same cache key, such as a
        // `FROM --platform=$BUILDPLATFORM` stage) run once.
        let solves = definitions.iter().map(|definition| {
            self.solver.solve(
                definition,
                locals.clone(),
                progress.clone(),
                options.clone(),
            )
        });
        let results = futures::future::try_join_all(solves)
            .await
            .map_err(|e| solve_error(&e))?;
        Ok(Built {
            platforms: builds
                .into_iter()
                .zip(results)
                .zip(definitions)
                .map(|((build, result), definition)| PlatformSolved {
                    platform: build.platform,
                    result,
                    image_config: build.image_config,
                    definition: Some(definition),
                })
                .collect(),
            multi_platform,
        })
    }

    /// The registry credentials of the build of `session_id` (see `registry_auth`).
    pub(crate) fn registry_auth(
        &self,
        session_id: &str,
    ) -> Option<Arc<dyn kiln_image::registry::auth::RegistryAuth>> {
        crate::registry_auth::for_session(&self.sessions, session_id)
    }

    /// The worker records `ListWorkers` and the gateway's `Ping` report.
    pub(crate) fn worker_records(&self) -> Vec<WorkerRecord> {
        vec![self.worker_record()]
    }

    async fn run_solve(
        &self,
        request: api::SolveRequest,
        progress: &ProgressWriter,
    ) -> Result<api::SolveResponse, Status> {
        let mut exporters: Vec<(String, BTreeMap<String, String>)> = request
            .exporters
            .iter()
            .map(|e| (e.r#type.clone(), e.attrs.clone()))
            .collect();
        if exporters.is_empty() && !request.exporter_deprecated.is_empty() {
            exporters.push((
                request.exporter_deprecated.clone(),
                request.exporter_attrs_deprecated.clone(),
            ));
        }
        // As BuildKit: the SOURCE_DATE_EPOCH build-arg is every exporter's
        // `source-date-epoch` unless the exporter sets its own.
        if let Some(epoch) = request.frontend_attrs.get("build-arg:SOURCE_DATE_EPOCH") {
            for (_, attrs) in &mut exporters {
                attrs
                    .entry("source-date-epoch".to_string())
                    .or_insert_with(|| epoch.clone());
            }
        }
        let kinds = exporters
            .iter()
            .map(|(kind, _)| ExporterKind::parse(kind))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;

        let session = if request.session.is_empty() {
            None
        } else {
            Some(
                self.sessions
                    .get(&request.session, SESSION_WAIT)
                    .await
                    .map_err(|e| {
                        Status::failed_precondition(format!("session {}: {e}", request.session))
                    })?,
            )
        };
        let tmp_root = self.root.join("tmp");
        let request_ref = request.r#ref.clone();
        let worker = self.solver.worker().clone();
        let cache = request.cache.clone().unwrap_or_default();
        let cache_exports = crate::cache::parse_exports(&cache.exports, &request.frontend_attrs)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        if !cache_exports.is_empty()
            && frontend::target_platforms(&request.frontend_attrs).is_ok_and(|p| p.len() > 1)
        {
            return Err(Status::unimplemented(
                "exporting the build cache of a multi-platform build is not supported yet: \
                 build one platform per --cache-to",
            ));
        }
        let _imports = if cache.imports.is_empty() {
            None
        } else {
            let vertex = progress.start_vertex(
                &frontend::synthetic_digest(&[&request_ref, "importing cache"]),
                "importing cache manifest",
                Vec::new(),
            );
            let source = crate::cache::ImportSource {
                worker: worker.as_ref(),
                session: session.as_deref(),
                tmp_dir: &tmp_root,
                hosts: exporter::registry_hosts(),
            };
            let imports = match crate::cache::import(&source, &cache.imports, &vertex).await {
                Ok(imports) => {
                    vertex.done();
                    imports
                }
                Err(e) => {
                    vertex.failed(&format!("{e:#}"));
                    return Err(Status::invalid_argument(format!(
                        "failed to import cache: {e:#}"
                    )));
                }
            };
            Some(CacheImportsGuard::new(self, &request_ref, imports))
        };
        let policy = match &request.source_policy {
            Some(policy) => SourcePolicy::compile(policy)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
                .map(Arc::new),
            None => None,
        };

        let provenance = crate::provenance::requested(&request.frontend_attrs)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        if provenance.is_some() && request.frontend.is_empty() {
            return Err(Status::unimplemented(
                "provenance attestations need the builtin dockerfile.v0 frontend: \
                 kiln does not attest builds of a raw definition or a gateway frontend yet",
            ));
        }
        let started = chrono::Utc::now();
        let built = match (request.frontend.as_str(), request.definition) {
            ("", None) => {
                // buildctl's path: the frontend runs through LLBBridge calls
                // keyed by this ref, and hands its result back with Return.
                let (job, returned) = crate::gateway::Job::new(
                    request_ref.clone(),
                    request.session.clone(),
                    progress.clone(),
                    request.entitlements.clone(),
                    policy.clone(),
                );
                let _registration = self.gateways.register(job.clone());
                let returned = returned.await.map_err(|_| {
                    Status::cancelled("the frontend ended without returning a result")
                })??;
                job.take_result(returned)?
            }
            (frontend, definition) => {
                self.build(
                    frontend,
                    definition,
                    &request.frontend_attrs,
                    &request.session,
                    &request.entitlements,
                    progress,
                    &request_ref,
                    policy.clone(),
                )
                .await?
            }
        };

        let mut response = BTreeMap::new();
        let makes_image = kinds.iter().any(|k| {
            matches!(
                k,
                ExporterKind::Image | ExporterKind::Docker | ExporterKind::Oci
            )
        });
        let inline = cache_exports
            .iter()
            .any(|e| e.backend == crate::cache::Backend::Inline);
        if inline && !makes_image {
            let vertex = progress.start_vertex(
                &frontend::synthetic_digest(&[&request_ref, "inline cache"]),
                "exporting inline cache",
                Vec::new(),
            );
            vertex.log(
                2,
                b"WARNING: inline cache needs an image, docker or oci exporter; no cache written\n",
            );
            vertex.done();
        }
        let facts = crate::provenance::BuildFacts {
            frontend: &request.frontend,
            attrs: &request.frontend_attrs,
            build_ref: &request_ref,
            started,
            finished: chrono::Utc::now(),
            build_platform: worker
                .platforms()
                .first()
                .cloned()
                .unwrap_or_else(Platform::host)
                .canonical(),
        };
        let mut refs: Vec<exporter::ExportRef> = Vec::with_capacity(built.platforms.len());
        for p in &built.platforms {
            let provenance = match (&provenance, &p.definition) {
                (Some(request), Some(definition)) => Some(
                    crate::provenance::predicate(request, &facts, definition)
                        .map_err(|e| Status::internal(format!("{e:#}")))?,
                ),
                _ => None,
            };
            refs.push(exporter::ExportRef {
                platform: p.platform.clone(),
                snapshot: p.result.snapshot.clone(),
                lazy: p.result.lazy.clone(),
                image_config: p.image_config.clone(),
                created: p.result.created,
                provenance,
            });
        }
        let input = exporter::ExportInput {
            worker: worker.as_ref(),
            refs: &refs,
            multi_platform: built.multi_platform,
            session: session.as_deref(),
            tmp_dir: &tmp_root,
            inline_cache: match built.platforms.as_slice() {
                [one] if inline => Some(&one.result),
                _ => None,
            },
        };
        for (index, ((_, attrs), kind)) in exporters.iter().zip(kinds).enumerate() {
            let title = kind.title();
            let vertex = progress.start_vertex(
                &frontend::synthetic_digest(&[&request_ref, title, &index.to_string()]),
                title,
                Vec::new(),
            );
            match exporter::export(kind, index, attrs, &input, &vertex).await {
                Ok(r) => {
                    vertex.done();
                    response.extend(r);
                }
                Err(e) => {
                    vertex.failed(&format!("{e:#}"));
                    return Err(Status::unknown(format!("failed to export: {e:#}")));
                }
            }
        }
        let target = crate::cache::ExportTarget {
            worker: worker.as_ref(),
            session: session.as_deref(),
            tmp_dir: &tmp_root,
            hosts: exporter::registry_hosts(),
        };
        let result = match built.platforms.as_slice() {
            [one] => Some(&one.result),
            _ => None,
        };
        for (n, export) in cache_exports.iter().enumerate() {
            let Some(result) = result else {
                return Err(Status::unimplemented(
                    "exporting the build cache of a multi-platform build is not supported yet: \
                     build one platform per --cache-to",
                ));
            };
            let vertex = progress.start_vertex(
                &frontend::synthetic_digest(&[&request_ref, "exporting cache", &n.to_string()]),
                "exporting cache",
                Vec::new(),
            );
            match crate::cache::export(&target, result, export, n, &vertex).await {
                Ok(()) => vertex.done(),
                Err(e) => {
                    vertex.failed(&format!("{e:#}"));
                    return Err(Status::unknown(format!("failed to export cache: {e:#}")));
                }
            }
        }
        Ok(api::SolveResponse {
            exporter_response: response,
        })
    }
}

/// Registers a build's imported caches for its solve and forgets them when
/// the build ends.
struct CacheImportsGuard<'a> {
    service: &'a ControlService,
    build_ref: String,
}

impl<'a> CacheImportsGuard<'a> {
    fn new(
        service: &'a ControlService,
        build_ref: &str,
        imports: kiln_solver::CacheImports,
    ) -> Self {
        if let Ok(mut map) = service.cache_imports.lock() {
            map.insert(build_ref.to_string(), imports);
        }
        Self {
            service,
            build_ref: build_ref.to_string(),
        }
    }
}

impl Drop for CacheImportsGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.service.cache_imports.lock() {
            map.remove(&self.build_ref);
        }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn disk_usage(
        &self,
        request: Request<api::DiskUsageRequest>,
    ) -> Result<Response<api::DiskUsageResponse>, Status> {
        crate::usage::disk_usage(&self.solver, request.into_inner())
            .await
            .map(Response::new)
    }

    type PruneStream = BoxStream<api::UsageRecord>;

    async fn prune(
        &self,
        request: Request<api::PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        let removed = crate::usage::prune(&self.solver, request.into_inner()).await?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            removed.into_iter().map(Ok),
        ))))
    }

    async fn solve(
        &self,
        request: Request<api::SolveRequest>,
    ) -> Result<Response<api::SolveResponse>, Status> {
        let request = request.into_inner();
        let build_ref = request.r#ref.clone();
        let span = tracing::info_span!("build", r#ref = %build_ref);
        let _entered = span.enter();
        tracing::info!(frontend = %request.frontend, "solve");
        drop(_entered);
        let (writer, guard) = self.jobs.start(&build_ref);
        // The solve runs inside this handler: when the client goes away,
        // tonic drops the future and with it every running step. Registry
        // requests of the build (pulls, pushes) ask the session for credentials.
        let auth = self.registry_auth(&request.session);
        let result =
            kiln_image::registry::auth::scope(auth, self.run_solve(request, &writer)).await;
        guard.finish(writer).await;
        if let Err(status) = &result {
            tracing::info!(r#ref = %build_ref, error = %status.message(), "solve failed");
        }
        result.map(Response::new)
    }

    type StatusStream = StatusStream;

    async fn status(
        &self,
        request: Request<api::StatusRequest>,
    ) -> Result<Response<Self::StatusStream>, Status> {
        Ok(Response::new(
            self.jobs.subscribe(&request.into_inner().r#ref),
        ))
    }

    type SessionStream = BoxStream<api::BytesMessage>;

    async fn session(
        &self,
        request: Request<tonic::Streaming<api::BytesMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let metadata = request.metadata().clone();
        let outbound = self
            .sessions
            .handle(&metadata, request.into_inner())
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(Box::pin(outbound)))
    }

    async fn list_workers(
        &self,
        _request: Request<api::ListWorkersRequest>,
    ) -> Result<Response<api::ListWorkersResponse>, Status> {
        Ok(Response::new(api::ListWorkersResponse {
            record: vec![self.worker_record()],
        }))
    }

    async fn info(
        &self,
        _request: Request<api::InfoRequest>,
    ) -> Result<Response<api::InfoResponse>, Status> {
        Ok(Response::new(api::InfoResponse {
            buildkit_version: Some(Self::version()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_steps_need_both_entitlements() {
        use prost::Message as _;
        let exec = pb::Op {
            op: Some(pb::op::Op::Exec(pb::ExecOp {
                security: pb::SecurityMode::Insecure as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        let definition = pb::Definition {
            def: vec![exec.encode_to_vec()],
            ..Default::default()
        };
        let insecure = vec!["security.insecure".to_string()];
        let denied = check_entitlements(&definition, &[], &insecure).unwrap_err();
        assert!(
            denied.message().contains("--allow-insecure-entitlement"),
            "{}",
            denied.message()
        );
        let denied = check_entitlements(&definition, &insecure, &[]).unwrap_err();
        assert!(
            denied.message().contains("kiln build --allow"),
            "{}",
            denied.message()
        );
        check_entitlements(&definition, &insecure, &insecure).unwrap();
        check_entitlements(&pb::Definition::default(), &[], &[]).unwrap();
    }

    #[test]
    fn failing_steps_carry_their_lines_as_a_status_detail() {
        let location = kiln_solver::SourceRange {
            filename: "Dockerfile".into(),
            start_line: 2,
            end_line: 2,
            data: b"FROM a\nRUN false\nCMD x\n".to_vec(),
        };
        let status = status_with_excerpt(
            tonic::Code::Unknown,
            "exit code: 1".into(),
            Some(step_excerpt(&location)),
        );
        assert_eq!(status.message(), "exit code: 1");
        let excerpts = kiln_llb::errdefs::excerpts_in_status_details(status.details());
        assert_eq!(excerpts.len(), 1);
        let text = excerpts[0].render();
        assert!(text.starts_with("Dockerfile:2\n"), "{text}");
        assert!(text.contains("   2 | >>> RUN false\n"), "{text}");
        assert!(text.contains("   1 |     FROM a\n"), "{text}");
        let plain = status_with_excerpt(tonic::Code::Unknown, "x".into(), None);
        assert!(kiln_llb::errdefs::excerpts_in_status_details(plain.details()).is_empty());
    }
}
