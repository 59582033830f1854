//! `DecodeEngine`: the actor in front of the compute thread (see [`super::compute`]).

use actix::prelude::*;

use super::compute::{fail, ComputeHandle, Job};
use super::core::Core;
use super::MAILBOX;

/// Owns the way into the compute thread; jobs that do not fit are failed here, cleanly.
#[derive(Debug)]
pub struct DecodeEngine {
    core: Core,
}

impl DecodeEngine {
    pub fn new(core: Core) -> Self {
        Self { core }
    }

    fn compute(&self) -> &ComputeHandle {
        &self.core.compute
    }
}

impl Actor for DecodeEngine {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

/// Run a job on the compute thread. `false` when the compute queue was full (the job was failed:
/// its client got an error event, or its `done` channel an error).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct RunJob(pub Job);

impl Handler<RunJob> for DecodeEngine {
    type Result = bool;

    fn handle(&mut self, RunJob(job): RunJob, _: &mut Self::Context) -> bool {
        match self.compute().submit(job) {
            Ok(()) => true,
            Err((e, job)) => {
                match *job {
                    Job::Generate(j) | Job::FinishImport { job: j, .. } => {
                        fail(&self.core.metrics, j, &e.to_string())
                    }
                    Job::ServePrefill { done, .. } => {
                        let _ = done.send(Err(e.to_string()));
                    }
                }
                false
            }
        }
    }
}
