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
    GenerateEvent, GenerateRequest, PrefillRoute, PromptInput, Submit, SubmitError, EVENT_CHANNEL,
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

    /// Prompt tokens of `req`, checked against the model's limits.
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
            PromptInput::Text(t) => text
                .codec
                .encode(t, false)
                .map_err(|e| SubmitError::BadRequest(format!("tokenizer: {e}")))?,
        };
        if tokens.is_empty() {
            return Err(SubmitError::BadRequest("the prompt is empty".into()));
        }
        let max = self.core.max_context;
        let want = tokens.len() + req.sampling.max_tokens;
        if want > max {
            return Err(SubmitError::BadRequest(format!(
                "{} prompt tokens + max_tokens {} = {want} exceeds the context length {max}",
                tokens.len(),
                req.sampling.max_tokens
            )));
        }
        Ok(tokens)
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
        if !self.core.cfg.is_home() {
            return self.reject(SubmitError::Unavailable(
                "this node only prefills for the mesh; send requests to a decode node".into(),
            ));
        }
        let inflight = self.core.inflight.load(Ordering::Acquire);
        if inflight >= self.core.cfg.api.max_inflight {
            return self.reject(SubmitError::Overloaded(inflight));
        }
        if req.sampling.max_tokens == 0 {
            return self.reject(SubmitError::BadRequest("max_tokens must be ≥ 1".into()));
        }
        let tokens = match self.tokenize(&req) {
            Ok(t) => t,
            Err(e) => return self.reject(e),
        };
        let mut sampling = req.sampling;
        for &t in &self.core.text.stop_tokens {
            if !sampling.stop_tokens.contains(&t) {
                sampling.stop_tokens.push(t);
            }
        }
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let job = Box::new(DecodeJob {
            request_id: self.core.next_request_id(),
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
