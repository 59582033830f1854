//! `Admission`: turns an API request into a planned job, or refuses it (400 / 429 / 503).

use std::sync::atomic::Ordering;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::compute::{DecodeJob, InflightGuard};
use super::core::Core;
use super::planner::{Plan, Planner};
use super::MAILBOX;
use crate::metrics::RequestLabels;
use crate::service::{
    Detokenize, GenerateEvent, GenerateRequest, Health, HealthReport, PrefillRoute, PromptInput,
    Submit, SubmitError, Tokenize, EVENT_CHANNEL,
};

#[derive(Debug)]
pub struct Admission {
    core: Core,
    planner: Addr<Planner>,
    accepting: bool,
}

impl Admission {
    pub fn new(core: Core, planner: Addr<Planner>) -> Self {
        Self {
            core,
            planner,
            accepting: true,
        }
    }

    fn reject(&self, e: SubmitError) -> Result<mpsc::Receiver<GenerateEvent>, SubmitError> {
        self.core
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                route: "none".into(),
                outcome: "rejected".into(),
            })
            .inc();
        Err(e)
    }

    /// Prompt tokens of `req`.
    fn tokenize(&self, req: &GenerateRequest) -> Result<Vec<u32>, SubmitError> {
        let text = &self.core.text;
        let tokens = match &req.prompt {
            PromptInput::Chat(msgs) => {
                if msgs.is_empty() {
                    return Err(SubmitError::BadRequest("`messages` is empty".into()));
                }
                text.encode_chat(msgs)
                    .map_err(|e| SubmitError::BadRequest(format!("chat prompt: {e}")))?
            }
            // As llama-server: a raw prompt's special-token text is the special token (chat
            // content never is: only the template makes control tokens).
            PromptInput::Text(t) => text
                .codec
                .encode(t, true)
                .map_err(|e| SubmitError::BadRequest(format!("tokenizer: {e}")))?,
        };
        if tokens.is_empty() {
            return Err(SubmitError::BadRequest("the prompt is empty".into()));
        }
        Ok(tokens)
    }

    /// `max_tokens` for a prompt of `prompt_tokens`: as asked, or what fits the context; refused
    /// with `context_length_exceeded` when the prompt and the completion do not fit.
    fn max_tokens(&self, asked: Option<usize>, prompt_tokens: usize) -> Result<usize, SubmitError> {
        let max_context = self.core.max_context;
        let room = max_context.saturating_sub(prompt_tokens);
        let max_tokens = asked.unwrap_or(room);
        if max_tokens == 0 || max_tokens > room {
            return Err(SubmitError::ContextLength {
                max_context,
                prompt_tokens,
                max_tokens: max_tokens.max(1),
            });
        }
        Ok(max_tokens)
    }
}

impl Actor for Admission {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

impl Handler<Submit> for Admission {
    type Result = Result<mpsc::Receiver<GenerateEvent>, SubmitError>;

    fn handle(&mut self, Submit(req): Submit, _: &mut Self::Context) -> Self::Result {
        if !self.accepting {
            return self.reject(SubmitError::Unavailable("node is shutting down".into()));
        }
        if !self.core.homes_now() {
            return self.reject(SubmitError::Unavailable(
                "this node only prefills for the mesh; send requests to a decode node".into(),
            ));
        }
        let inflight = self.core.inflight.load(Ordering::Acquire);
        if inflight >= self.core.cfg.api.max_inflight {
            return self.reject(SubmitError::Overloaded(inflight));
        }
        let tokens = match self.tokenize(&req) {
            Ok(t) => t,
            Err(e) => return self.reject(e),
        };
        let mut sampling = req.sampling;
        sampling.max_tokens = match self.max_tokens(req.max_tokens, tokens.len()) {
            Ok(m) => m,
            Err(e) => return self.reject(e),
        };
        for &t in &self.core.text.stop_tokens {
            if !sampling.stop_tokens.contains(&t) {
                sampling.stop_tokens.push(t);
            }
        }
        let request_id = self.core.next_request_id();
        let client_id = req
            .request_id
            .unwrap_or_else(|| format!("prfaas-{request_id:x}"));
        let span = tracing::info_span!(
            "request",
            request_id = %client_id,
            mesh_request = request_id,
            route = tracing::field::Empty,
            peer = tracing::field::Empty,
        );
        span.in_scope(|| {
            tracing::info!(
                prompt_tokens = tokens.len(),
                max_tokens = sampling.max_tokens,
                "admitted"
            )
        });
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let job = Box::new(DecodeJob {
            request_id,
            span,
            tokens,
            sampling,
            stop: req.stop,
            events: tx,
            route: PrefillRoute::Local {
                reason: "pending".into(),
            },
            admitted: Instant::now(),
            guard: InflightGuard::new(self.core.inflight.clone(), self.core.metrics.clone()),
        });
        match self.planner.try_send(Plan(job)) {
            Ok(()) => Ok(rx),
            Err(_) => {
                let inflight = self.core.inflight.load(Ordering::Acquire);
                self.reject(SubmitError::Overloaded(inflight))
            }
        }
    }
}

/// Stop admitting (graceful shutdown); requests in flight continue.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopAdmitting;

impl Handler<StopAdmitting> for Admission {
    type Result = ();

    fn handle(&mut self, _: StopAdmitting, _: &mut Self::Context) {
        self.accepting = false;
    }
}

impl Handler<Tokenize> for Admission {
    type Result = Result<Vec<(u32, Vec<u8>)>, SubmitError>;

    fn handle(&mut self, req: Tokenize, _: &mut Self::Context) -> Self::Result {
        let codec = &self.core.text.codec;
        let ids = codec
            .tokenize(&req.text, req.add_special, req.parse_special)
            .map_err(|e| SubmitError::BadRequest(format!("tokenizer: {e}")))?;
        Ok(ids
            .into_iter()
            .map(|id| (id, codec.piece(id).unwrap_or_default()))
            .collect())
    }
}

impl Handler<Detokenize> for Admission {
    type Result = Result<String, SubmitError>;

    fn handle(&mut self, Detokenize(ids): Detokenize, _: &mut Self::Context) -> Self::Result {
        let codec = &self.core.text.codec;
        let vocab = self.core.vocab;
        let mut bytes = Vec::new();
        for id in ids {
            let piece = (id as usize)
                .lt(&vocab)
                .then(|| codec.piece(id))
                .flatten()
                .ok_or_else(|| {
                    SubmitError::BadRequest(format!(
                        "token {id} is outside this model's vocabulary of {vocab} tokens"
                    ))
                })?;
            bytes.extend_from_slice(&piece);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

impl Handler<Health> for Admission {
    type Result = ResponseFuture<HealthReport>;

    fn handle(&mut self, _: Health, _: &mut Self::Context) -> Self::Result {
        let core = self.core.clone();
        let accepting = self.accepting;
        Box::pin(async move {
            let home = core.cfg.is_home();
            let prefill_peers = if home {
                let me = core.mesh.local_peer_id();
                let peers = core
                    .mesh
                    .prefill_candidates(core.model_ref.clone())
                    .await
                    .unwrap_or_default();
                Some(peers.iter().filter(|(p, _)| *p != me).count())
            } else {
                None
            };
            let mut warnings = Vec::new();
            if prefill_peers == Some(0) {
                warnings.push(
                    "no prefill-capable peer for this model is known: every prompt is prefilled here"
                        .to_owned(),
                );
            }
            HealthReport {
                status: if accepting { "ok" } else { "draining" }.to_owned(),
                ready: accepting,
                prefill_peers,
                warnings,
            }
        })
    }
}
