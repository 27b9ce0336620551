// streamq web chat: submits jobs to /v1/jobs and reads their events with fetch() (EventSource
// cannot send an Authorization header), resuming with Last-Event-ID when a stream drops.
// Model text only ever goes into the page as text nodes (textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  // Storage is the origin's: a page under a path prefix (a proxy's /llm/) keeps its own.
  const SCOPE = location.pathname === "/" ? "" : `:${location.pathname}`;
  const KEY_STORE = `streamq.apiKey${SCOPE}`;
  const FINAL = new Set(["done", "error", "canceled"]);
  const RETRY_STATUSES = new Set([429, 502, 503, 504]);
  const BACKOFF = { initial: 250, factor: 2, cap: 4000, maxAttempts: 12 };

  // The conversation sent with each question: finished answers only (a stopped or failed
  // answer is left out together with its question).
  let history = [];
  let running = null; // {jobId, stopped, resume}

  class ApiError extends Error {
    constructor(status, body) {
      const e = (body && body.error) || {};
      super(e.message || `HTTP ${status}`);
      this.status = status;
      this.type = e.type || "api_error";
      this.code = e.code || null;
    }
  }

  function headers(extra) {
    const h = Object.assign({}, extra);
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function api(method, path, body, extra) {
    const init = { method, headers: headers(Object.assign(body ? { "Content-Type": "application/json" } : {}, extra)) };
    if (body) init.body = JSON.stringify(body);
    const res = await fetch(path, init);
    let data = null;
    try { data = await res.json(); } catch (_) { data = null; }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  function notice(text) {
    const el = $("notice");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function explain(err) {
    if (err instanceof ApiError && err.status === 401) {
      return "The server wants an API key: enter it in the API key field.";
    }
    return err.message || String(err);
  }

  // ----- models ------------------------------------------------------------------------------
  async function loadModels() {
    const select = $("model");
    try {
      const list = await api("GET", "v1/models");
      // The one chosen, else the one this tab chose before a reload (restore()).
      const wanted = select.value || keptModel;
      select.replaceChildren();
      for (const m of list.data) {
        const opt = document.createElement("option");
        opt.value = m.id;
        opt.textContent = m.id;
        select.append(opt);
      }
      const served = list.data.some((m) => m.id === wanted);
      if (served) select.value = wanted;
      if (!list.data.length) {
        notice("No model is served right now (no live worker).");
        keptModel = wanted; // the choice stays for the next list
        return;
      }
      notice(wanted && !served ? `The model ${wanted} is not served now: questions go to ${select.value}.` : "");
      keptModel = "";
      save();
    } catch (err) {
      notice(explain(err));
    }
  }

  // ----- rendering ---------------------------------------------------------------------------
  function addMessage(role, text) {
    $("empty").hidden = true;
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "body";
    const status = document.createElement("div");
    status.className = "status";
    el.append(who, body, status);
    $("log").append(el);
    renderText(body, text);
    return { el, body, status };
  }

  // Text with ``` fences shown as code blocks; everything goes in as text nodes.
  function renderText(body, text) {
    const parts = text.split("```");
    const nodes = parts.map((part, i) => {
      if (i % 2 === 0) return document.createTextNode(part);
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      const newline = part.indexOf("\n");
      const tag = newline >= 0 ? part.slice(0, newline) : "";
      code.textContent = /^[\w+#.-]*$/.test(tag) && newline >= 0 ? part.slice(newline + 1) : part;
      pre.append(code);
      return pre;
    });
    body.replaceChildren(...nodes);
  }

  function scrollDown() {
    const log = $("log");
    log.scrollTop = log.scrollHeight;
  }

  // ----- streaming ---------------------------------------------------------------------------
  // Server-Sent Events from a fetch() body: calls onEvent({id, event, data}) per event, and
  // heard() whenever bytes come (keep-alive comments too).
  async function readEvents(response, onEvent, heard) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let ev = { id: null, event: "message", data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      heard();
      buffer += value;
      let cut;
      while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
        if (buffer[cut] === "\r" && cut === buffer.length - 1) break; // wait: \r\n may be split
        const line = buffer.slice(0, cut);
        buffer = buffer.slice(buffer.startsWith("\r\n", cut) ? cut + 2 : cut + 1);
        if (line === "") {
          if (ev.data.length) {
            let data;
            try { data = JSON.parse(ev.data.join("\n")); } catch (_) { data = {}; }
            if (onEvent({ id: ev.id, event: ev.event, data })) {
              reader.cancel().catch(() => {});
              return true;
            }
          }
          ev = { id: null, event: "message", data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const name = colon >= 0 ? line.slice(0, colon) : line;
          const val = colon >= 0 ? line.slice(colon + 1).replace(/^ /, "") : "";
          if (name === "event") ev.event = val;
          else if (name === "data") ev.data.push(val);
          else if (name === "id") ev.id = val;
        }
      }
    }
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // A stream with nothing, not even a keep-alive, for this long is taken for dropped: a front that
  // froze, or a network path that lost it without a reset, would hold the answer forever. The
  // front sends a keep-alive after X-Streamq-Ping-Interval seconds of silence (15 by default).
  const silenceLimit = (ping) => (2 * ping + 5) * 1000;
  let silenceMs = silenceLimit(15);

  // Follows a job to its final event; resumes with Last-Event-ID after a drop (capped backoff).
  async function follow(jobId, onEvent, onRetry) {
    let lastId = null;
    let attempts = 0;
    let retryAfter = 0; // ms a 429/5xx asked for
    let pageError = null;
    for (;;) {
      let why;
      const stream = new AbortController();
      let timer = null;
      let stalled = false;
      const heard = () => {
        clearTimeout(timer);
        timer = setTimeout(() => { stalled = true; stream.abort(); }, silenceMs);
      };
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (lastId) h["Last-Event-ID"] = lastId;
        heard(); // the wait for the answer's headers counts too
        const res = await fetch(`v1/jobs/${encodeURIComponent(jobId)}/events`,
          { headers: h, cache: "no-store", signal: stream.signal });
        const ping = parseFloat(res.headers.get("X-Streamq-Ping-Interval"));
        if (ping > 0) silenceMs = silenceLimit(ping);
        heard();
        if (res.status === 204) return; // the final event was already received
        if (!res.ok) {
          let body = null;
          try { body = await res.json(); } catch (_) { body = null; }
          const err = new ApiError(res.status, body);
          if (!RETRY_STATUSES.has(res.status)) throw err;
          why = err.message;
          retryAfter = 1000 * (parseFloat(res.headers.get("Retry-After")) || 0);
        } else {
          const ended = await readEvents(res, (ev) => {
            try {
              onEvent(ev);
            } catch (bug) {
              pageError = bug; // not the connection's fault: do not retry it
              return true;
            }
            if (ev.id) lastId = ev.id; // after it was shown: a resume never skips an event
            attempts = 0;
            return FINAL.has(ev.event);
          }, heard);
          if (pageError) throw pageError;
          if (ended) return;
          why = "the stream ended early";
        }
      } catch (err) {
        if (err === pageError) throw err;
        if (err instanceof ApiError && !RETRY_STATUSES.has(err.status)) throw err;
        why = stalled ? `nothing came for ${Math.round(silenceMs / 1000)} s` : why || err.message || "network error";
      } finally {
        clearTimeout(timer);
      }
      attempts += 1;
      if (attempts > BACKOFF.maxAttempts) throw new Error(`connection lost: ${why}`);
      const backoff = Math.min(BACKOFF.cap, BACKOFF.initial * BACKOFF.factor ** (attempts - 1));
      const wait = Math.max(retryAfter, backoff * (1 + 0.1 * Math.random()));
      retryAfter = 0;
      onRetry(attempts, wait);
      await sleep(wait);
    }
  }

  function queuedText(data) {
    const pos = data.position;
    if (pos === null || pos === undefined) return "Queued, waiting for a worker…";
    const ahead = pos === 0 ? "next in line" : `${pos} job${pos > 1 ? "s" : ""} ahead`;
    const eta = typeof data.estimated_wait_seconds === "number" ? ` · about ${Math.ceil(data.estimated_wait_seconds)} s` : "";
    return `Queued · ${ahead}${eta}`;
  }

  function doneText(data) {
    const t = data.timings || {};
    const u = data.usage || {};
    const rate = t.tokens_per_second ? ` · ${t.tokens_per_second.toFixed(1)} tok/s` : "";
    return `${data.finish_reason} · ${u.completion_tokens} tokens · ${(t.generation_seconds || 0).toFixed(1)} s${rate}`;
  }

  // ----- what a reload keeps ------------------------------------------------------------------
  // The conversation shown, the one sent, and the answer being written are kept for this tab
  // (sessionStorage): a reload shows them again and follows the running job from its first event
  // (it ran on meanwhile), rather than losing the conversation and leaving the job unseen.
  const SAVED = `streamq.chat${SCOPE}`;
  let keptModel = ""; // the model this tab had chosen, until the list of models is back
  const SUBMIT_RESENDS = 3; // a question whose answer was lost on the way is sent again this often
  let shown = []; // {role, text, status?, state?, jobId?, note?} of each ended exchange, in order

  function save() {
    // A question stopped before its job's id came back is kept too: sent again after a reload,
    // its job (made or not) is then canceled.
    const pending = running && running.resume && !(running.stopped && running.resume.jobId)
      ? Object.assign({}, running.resume, { stopped: running.stopped })
      : null;
    try {
      const settings = { model: $("model").value || keptModel, maxTokens: $("max-tokens").value };
      sessionStorage.setItem(SAVED, JSON.stringify({ history, shown, pending, settings }));
    } catch (_) { /* storage full or refused: the page works on, a reload just forgets */ }
  }

  // What another version of the page (or a hand) left there is checked before it is used: a
  // conversation that cannot be read is a new one.
  const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  const isTurn = (m) => isObject(m) && typeof m.role === "string" && typeof m.content === "string";

  function restore() {
    let kept = {};
    try { kept = JSON.parse(sessionStorage.getItem(SAVED) || "{}"); } catch (_) { kept = {}; }
    if (!isObject(kept)) kept = {};
    // The model and the answer's length chosen: the next question goes where the last one went.
    const settings = isObject(kept.settings) ? kept.settings : {};
    if (typeof settings.model === "string" && !$("model").value) keptModel = settings.model;
    if (typeof settings.maxTokens === "string") $("max-tokens").value = settings.maxTokens;
    history = Array.isArray(kept.history) && kept.history.every(isTurn) ? kept.history : [];
    shown = Array.isArray(kept.shown) ? kept.shown.filter(isObject) : [];
    for (const m of shown) {
      const msg = addMessage(m.role === "user" ? "user" : "assistant", String(m.text || ""));
      if (typeof m.state === "string") msg.el.dataset.state = m.state;
      if (typeof m.jobId === "string") msg.el.dataset.jobId = m.jobId;
      if (typeof m.status === "string") msg.status.textContent = m.status;
      if (typeof m.note === "string") noteOn(msg, m.note);
    }
    // A question whose job id had not come back (a reload while it was being sent) is sent
    // again with its Idempotency-Key: the front answers the job the first send made, if any.
    const p = kept.pending;
    const sent = isObject(p) && (typeof p.jobId === "string" || (p.jobId === null && typeof p.key === "string"));
    if (sent && isObject(p.body) && Array.isArray(p.body.messages) &&
        p.body.messages.every(isTurn) && typeof p.question === "string") {
      addMessage("user", p.question);
      answerIn(p.question, p.body, p.jobId, Number(p.dropped) || 0, typeof p.key === "string" ? p.key : newKey(),
        p.stopped === true);
    }
    scrollDown();
  }

  // ----- a question and its answer -----------------------------------------------------------
  async function ask(question) {
    const body = { messages: history.concat([{ role: "user", content: question }]) };
    const model = $("model").value || keptModel; // the one kept, until the list is back
    if (model) body.model = model;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    addMessage("user", question);
    await answerIn(question, body, null, 0, newKey());
  }

  // A question's Idempotency-Key (random; each body it is sent with adds its count of
  // exchanges left out): kept with it, so a reload while it is sent does not make a second job.
  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes); // randomUUID() is only in secure contexts: not plain http
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // The answer to ``body`` (its last message the question) in a new bubble: submitted here, or,
  // given ``jobId``, a job submitted before the page was reloaded, followed from its start.
  async function answerIn(question, body, jobId, dropped, key, stopped) {
    const answer = addMessage("assistant", "");
    answer.el.dataset.state = "queued";
    answer.status.textContent = jobId ? "Reconnecting…" : "Sending…";
    scrollDown();
    setRunning(true);
    let text = "";
    let state = "queued";
    let pending = false;
    const draw = () => {
      pending = false;
      const nearBottom = $("log").scrollHeight - $("log").scrollTop - $("log").clientHeight < 80;
      renderText(answer.body, text);
      if (nearBottom) scrollDown();
    };
    try {
      running = { jobId: null, stopped: !!stopped, resume: null }; // Stop works from here on, even before the id
      for (;;) {
        let tooLong = false; // the worker's refusal: the front could not count the prompt in time
        if (jobId === null) {
          const job = await submitFitting(question, body, answer, dropped, key);
          dropped = job.dropped;
          jobId = job.id;
          answer.status.textContent = queuedText(job);
        } else if (dropped) {
          noteDropped(answer, dropped);
        }
        running.jobId = jobId;
        running.resume = { question, body, jobId, dropped, key };
        save();
        answer.el.dataset.jobId = jobId;
        if (running.stopped) cancelJob(jobId); // Stop was pressed while the question was sent
        if (!$("model").value) loadModels(); // a worker came since the page loaded
        await follow(
          jobId,
          (ev) => {
            if (ev.event === "queued") {
              answer.status.textContent = queuedText(ev.data);
            } else if (ev.event === "started") {
              state = "running";
              answer.status.textContent = "Generating…";
            } else if (ev.event === "delta") {
              state = "running";
              text += ev.data.text || "";
              answer.status.textContent = "Generating…";
              if (!pending) { pending = true; requestAnimationFrame(draw); }
            } else if (ev.event === "done") {
              state = "done";
              answer.status.textContent = doneText(ev.data);
            } else if (ev.event === "error" && ev.data.code === TOO_LONG && trimmable(body) && !running.stopped) {
              tooLong = true;
              answer.status.textContent = "Too long for the model's context · leaving out the oldest exchange…";
            } else if (ev.event === "error") {
              state = "error";
              answer.status.textContent = `Failed: ${ev.data.message || ev.data.type || "error"}`;
            } else if (ev.event === "canceled") {
              state = "canceled";
              answer.status.textContent = "Stopped · not kept in the conversation";
            }
            answer.el.dataset.state = state;
          },
          (attempt, wait) => {
            answer.status.textContent = `Connection lost · reconnecting (try ${attempt}, in ${(wait / 1000).toFixed(1)} s)…`;
          },
        );
        if (!tooLong) break;
        body.messages = body.messages.slice(2);
        dropped += 1;
        jobId = null;
      }
    } catch (err) {
      state = "error";
      answer.status.textContent = explain(err);
    }
    draw();
    answer.el.dataset.state = state;
    if (state === "done") {
      history = body.messages.concat([{ role: "assistant", content: text }]);
    }
    const note = answer.el.querySelector(".note");
    shown.push({ role: "user", text: question }, {
      role: "assistant", text, state, status: answer.status.textContent,
      jobId: answer.el.dataset.jobId || null, note: note ? note.textContent : null,
    });
    running = null;
    save();
    setRunning(false);
  }

  const TOO_LONG = "context_length_exceeded";
  const trimmable = (body) => body.messages.length >= 3; // an exchange to leave out, and the question

  // Submit; while the conversation is longer than the model's context (the front's 400), leave
  // out its oldest exchange (a question and its answer) and send it again, saying so under the
  // answer, as the terminal chat does. The question alone that does not fit is the error.
  // ``dropped``: exchanges already left out for this question (after a worker's refusal); the
  // job comes back with the total as its ``dropped``.
  async function submitFitting(question, body, answer, dropped, key) {
    for (let lost = 0; ; ) {
      running.resume = { question, body, jobId: null, dropped, key };
      save(); // before it is sent: a reload from here on sends it again with its key
      try {
        const job = await api("POST", "v1/jobs", body, { "Idempotency-Key": `${key}-${dropped}` });
        if (dropped) noteDropped(answer, dropped);
        return Object.assign(job, { dropped });
      } catch (err) {
        // The answer lost on the way (fetch's TypeError, a gateway's 502/504): sent again with
        // its key, it gets the job the first send made, if it made one.
        const lostOnTheWay = !(err instanceof ApiError) || err.status === 502 || err.status === 504;
        if (lostOnTheWay && lost < SUBMIT_RESENDS) {
          lost += 1;
          answer.status.textContent = `Connection lost · sending again (try ${lost})…`;
          await new Promise((done) => setTimeout(done, 500 * 2 ** lost));
          continue;
        }
        const tooLong = err instanceof ApiError && err.code === TOO_LONG;
        if (!tooLong || !trimmable(body)) throw err;
        body.messages = body.messages.slice(2);
        dropped += 1;
      }
    }
  }

  function noteDropped(answer, dropped) {
    noteOn(answer, `The conversation outgrew the model's context: its ${dropped} oldest ` +
      (dropped > 1 ? "exchanges were" : "exchange was") + " left out.");
  }

  function noteOn(msg, text) {
    let note = msg.el.querySelector(".note");
    if (!note) {
      note = document.createElement("div");
      note.className = "note";
      msg.el.append(note);
    }
    note.textContent = text;
  }

  async function stop() {
    if (!running || running.stopped) return;
    running.stopped = true;
    save(); // a reload from here on does not follow the answer on
    $("stop").disabled = true;
    if (running.jobId) await cancelJob(running.jobId); // else: ask() cancels once the id is back
  }

  async function cancelJob(jobId) {
    try {
      await api("POST", `v1/jobs/${encodeURIComponent(jobId)}/cancel`);
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 409)) notice(`Could not stop: ${explain(err)}`);
    }
  }

  function setRunning(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
    $("stop").disabled = false;
    $("question").disabled = on;
    if (!on) $("question").focus();
  }

  // ----- wiring ------------------------------------------------------------------------------
  function init() {
    const keyInput = $("api-key");
    keyInput.value = localStorage.getItem(KEY_STORE) || "";
    keyInput.addEventListener("input", () => localStorage.setItem(KEY_STORE, keyInput.value.trim()));
    keyInput.addEventListener("change", loadModels);
    $("ask").addEventListener("submit", (e) => {
      e.preventDefault();
      const q = $("question").value.trim();
      if (!q || running) return;
      $("question").value = "";
      ask(q);
    });
    $("question").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("ask").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("model").addEventListener("change", save);
    $("max-tokens").addEventListener("input", save);
    $("question").addEventListener("focus", () => { if (!$("model").value) loadModels(); });
    $("new-chat").addEventListener("click", () => {
      if (running) return;
      history = [];
      shown = [];
      save();
      $("log").replaceChildren($("empty"));
      $("empty").hidden = false;
    });
    restore();
    loadModels();
    $("question").focus();
  }

  init();
})();
