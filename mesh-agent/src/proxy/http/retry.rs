//! The attempts of one request: an endpoint per attempt from the Service's [`Picker`] (the
//! same picker TCP connections use), each attempt bounded by the per-try timeout
//! (`switchyard.io/per-try-timeout`), retried within the policy and the retry budget.
//!
//! A request never sent (connect failure, connection closed before it was written) is retried
//! whatever its method. Once sent, only idempotent methods (or all, with
//! `switchyard.io/retry-non-idempotent`) whose body was kept are retried: on a reset before the
//! response, a try past its per-try timeout, or a status in `switchyard.io/retry-on`.
use std::{
    net::SocketAddrV4,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use hyper::{Request, Response, body::Incoming};
use tracing::debug;

use super::{
    AttemptBody, Body, Downstream, Head, ServiceState, Upstreams,
    observe::Outcome,
    policy::{ProxyAnswer, idempotent, now_sec},
    upstream::SenderError,
};
use crate::proxy::{
    balance,
    route::{Path, Route, Target},
    upstream::Picker,
};

/// How one attempt failed.
enum Failed {
    /// No upstream connection: nothing was sent.
    Connect(SenderError),
    /// The body was streamed to an earlier attempt: it cannot be sent again.
    BodyGone,
    /// The connection closed before the request was written (the body is back in place).
    NotSent(hyper::Error),
    /// Sent, then the connection failed before a response.
    Reset(hyper::Error),
    /// Past the per-try timeout; `sent`: the request had been handed to the connection.
    PerTry { sent: bool },
}

impl Failed {
    fn reason(&self) -> &'static str {
        match self {
            Failed::Connect(e) => e.reason(),
            Failed::BodyGone => "body_gone",
            Failed::NotSent(_) => "not_sent",
            Failed::Reset(_) => "reset",
            Failed::PerTry { .. } => "per_try_timeout",
        }
    }
}

impl<U: Upstreams> Downstream<U> {
    /// Attempts until a response to return; `Err` is a response the proxy makes.
    pub(super) async fn attempts(
        &self,
        route: &Route,
        svc: &ServiceState,
        head: &Head,
        body: &mut AttemptBody,
        current: &Mutex<Option<(SocketAddrV4, Instant)>>,
        outcome: &Mutex<Outcome>,
    ) -> Result<Response<Incoming>, Response<Body>> {
        let http = self.up.http();
        let balancer = self.up.balancer();
        let policy = &svc.policy;
        let entry = &route.service().expect("HTTP is served for Services").entry;
        let retry_sent = (idempotent(&head.method) || policy.retry_non_idempotent) && body.replayable();
        let mut picker = Picker::new(route, self.up.route_config(), true);
        let mut retries = 0u32;
        let can_retry = |retries: u32| self.may_retry(svc, &entry.service, retries);
        loop {
            let t = self.pick(&mut picker, route, outcome, retries)?;
            let _in_flight = balancer.start(t.ep);
            let started = Instant::now();
            *current.lock().unwrap_or_else(|p| p.into_inner()) = Some((t.ep, started));
            let failure = |what: &str| {
                current.lock().unwrap_or_else(|p| p.into_inner()).take();
                http.stats.upstream_failures.inc();
                balancer.failed(t.ep, &entry.endpoints, started.elapsed());
                debug!(service = %entry.service, endpoint = %t.ep, "attempt failed: {what}");
            };
            let resp = match self.timed_attempt(route, &t, head, body, policy.per_try_timeout).await {
                Ok(resp) => resp,
                Err(Failed::Connect(SenderError::Connect(e))) if e.is_final() => {
                    let answer = if e.is_denial() { ProxyAnswer::Denied } else { ProxyAnswer::UpstreamUnavailable };
                    return Err(answer.respond(format!("service {}: endpoint {}: {e}", entry.service, t.ep)));
                }
                Err(f) => {
                    failure(f.reason());
                    if let Failed::Connect(SenderError::Connect(e)) = &f {
                        picker.failed(&t, e);
                    }
                    // Never sent: safe to retry whatever the method; sent: only if allowed.
                    let retriable = match &f {
                        Failed::Connect(_) | Failed::NotSent(_) => true,
                        Failed::PerTry { sent } => !sent || retry_sent,
                        Failed::Reset(_) => retry_sent,
                        Failed::BodyGone => false,
                    } && body.available();
                    if retriable && can_retry(retries) {
                        retries = self.before_retry(outcome, f.reason().into(), retries).await;
                        continue;
                    }
                    return Err(self.give_up(&entry.service, t.ep, f, policy.per_try_timeout));
                }
            };
            let status = resp.status();
            if status.is_server_error() {
                failure("status");
            } else {
                current.lock().unwrap_or_else(|p| p.into_inner()).take();
                balancer.connected(t.ep, started.elapsed());
            }
            if retry_sent && policy.retry_on.contains(&status.as_u16()) && can_retry(retries) {
                drop(resp);
                retries = self.before_retry(outcome, format!("status_{}", status.as_u16()).into(), retries).await;
                continue;
            }
            return Ok(resp);
        }
    }

    /// May another attempt follow `retries` retries? Within the Service's retries and its
    /// budget (a refusal by the budget is counted).
    fn may_retry(&self, svc: &ServiceState, service: &str, retries: u32) -> bool {
        let policy = &svc.policy;
        if retries >= policy.retries {
            return false;
        }
        let ok =
            svc.budget.lock().unwrap_or_else(|p| p.into_inner()).try_withdraw(now_sec(), policy.retry_budget_percent);
        if !ok {
            self.up.http().stats.budget_exhausted.inc();
            debug!(service, "retry budget exhausted");
        }
        ok
    }

    /// The endpoint for the next attempt, noted on the request; `Err`: none is left (or the
    /// route to the one picked is refused), answered by the proxy.
    #[allow(clippy::result_large_err)] // the answer is returned at once, never stored
    fn pick(
        &self,
        picker: &mut Picker<'_>,
        route: &Route,
        outcome: &Mutex<Outcome>,
        retries: u32,
    ) -> Result<Target, Response<Body>> {
        let service = &route.service().expect("HTTP is served for Services").entry.service;
        match picker.next(self.up.balancer()) {
            Some(Ok(t)) => {
                self.note_endpoint(route, outcome, t.ep, Some(&t.path), retries);
                Ok(t)
            }
            Some(Err((ep, refusal))) => {
                self.note_endpoint(route, outcome, ep, None, retries);
                self.up.refused(&refusal);
                let answer = if refusal.is_denial() { ProxyAnswer::Denied } else { ProxyAnswer::UpstreamUnavailable };
                Err(answer.respond(format!("service {service}: {refusal}")))
            }
            None => Err(ProxyAnswer::NoEndpoints.respond(format!("service {service} has no ready endpoint"))),
        }
    }

    /// One attempt, cancelled at the per-try timeout if there is one.
    async fn timed_attempt(
        &self,
        route: &Route,
        t: &Target,
        head: &Head,
        body: &mut AttemptBody,
        per_try: Option<std::time::Duration>,
    ) -> Result<Response<Incoming>, Failed> {
        let sent = AtomicBool::new(false);
        let attempt = self.attempt(route, t, head, body, &sent);
        match per_try {
            Some(d) => match tokio::time::timeout(d, attempt).await {
                Ok(r) => r,
                Err(_) => {
                    self.up.http().stats.per_try_timeouts.inc();
                    Err(Failed::PerTry { sent: sent.load(Ordering::Acquire) })
                }
            },
            None => attempt.await,
        }
    }

    /// The endpoint of the latest attempt (and how it is reached; `None`: refused), on the
    /// connection record and for the request's telemetry.
    fn note_endpoint(
        &self,
        route: &Route,
        outcome: &Mutex<Outcome>,
        ep: SocketAddrV4,
        path: Option<&Path>,
        retries: u32,
    ) {
        self.up.observe().conns.set_endpoint(self.conn, ep, route.pod_at(ep), retries);
        let mut o = outcome.lock().unwrap_or_else(|p| p.into_inner());
        (o.endpoint, o.path, o.retries) = (Some(ep), path.cloned(), retries);
    }

    /// Records why a retry is made, counts it and waits its backoff; the new retry count.
    async fn before_retry(&self, outcome: &Mutex<Outcome>, why: std::borrow::Cow<'static, str>, retries: u32) -> u32 {
        outcome.lock().unwrap_or_else(|p| p.into_inner()).reasons.push(why);
        self.up.http().stats.retries.inc();
        tokio::time::sleep(balance::backoff(retries + 1)).await;
        retries + 1
    }

    /// One attempt on `t`: an upstream connection, then the request, up to the response head.
    async fn attempt(
        &self,
        route: &Route,
        t: &Target,
        head: &Head,
        body: &mut AttemptBody,
        sent: &AtomicBool,
    ) -> Result<Response<Incoming>, Failed> {
        let mut sender = self.sender(route, t).await.map_err(Failed::Connect)?;
        let b = body.take().ok_or(Failed::BodyGone)?;
        let mut req = Request::new(b);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers.clone();
        sent.store(true, Ordering::Release);
        match sender.send(req).await {
            Ok(resp) => {
                self.keep(t.ep, sender).await;
                Ok(resp)
            }
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    // Never written: the same body goes to the next attempt.
                    body.put_back(req.into_body());
                    sent.store(false, Ordering::Release);
                    Err(Failed::NotSent(e.into_error()))
                }
                None => Err(Failed::Reset(e.into_error())),
            },
        }
    }

    /// The answer once no further attempt is made after `f`.
    fn give_up(
        &self,
        service: &str,
        ep: SocketAddrV4,
        f: Failed,
        per_try: Option<std::time::Duration>,
    ) -> Response<Body> {
        match f {
            Failed::Connect(e) => {
                ProxyAnswer::UpstreamUnavailable.respond(format!("service {service}: endpoint {ep}: {e}"))
            }
            Failed::BodyGone => {
                ProxyAnswer::UpstreamReset.respond(format!("service {service}: the request body was already sent once"))
            }
            Failed::NotSent(e) | Failed::Reset(e) => ProxyAnswer::UpstreamReset
                .respond(format!("service {service}: endpoint {ep} failed before responding: {e}")),
            Failed::PerTry { .. } => ProxyAnswer::RequestTimeout.respond(format!(
                "service {service}: endpoint {ep} did not answer within {:?} (switchyard.io/per-try-timeout)",
                per_try.unwrap_or_default()
            )),
        }
    }
}
