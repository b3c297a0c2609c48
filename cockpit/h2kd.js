// h2kd's Cockpit page: follows the daemon's objects over D-Bus (org.hyper2kvm.h2kd1 on the system bus)
// and renders the job list, one job's details, the conversion form, the queue, workers and health.
// Plain JavaScript on cockpit.js; no build step.
//
// The job list comes from ListJobs and the daemon's signals, not from ObjectManager proxies: with the
// 10,000 jobs h2kd keeps at most, GetManagedObjects is 13 MB, and the page took 7-8 s to show its table.
// Only the jobs on screen (and the one whose details are open) are read in full, with Properties.GetAll;
// the open job's Spec and Result, which GetAll leaves out, with Properties.Get.

/* global cockpit */

const _ = cockpit.gettext;

const BUS_NAME = "org.hyper2kvm.h2kd1";
const MANAGER_PATH = "/org/hyper2kvm/h2kd1";
const MANAGER_IFACE = BUS_NAME + ".Manager";
const JOB_IFACE = BUS_NAME + ".Job";
const WORKER_IFACE = BUS_NAME + ".Worker";
const EXPLICIT_JOB_PROPERTIES = ["Spec", "Result"];   // not in GetAll: read one by one with Get

const FINAL_STATES = new Set(["completed", "failed", "cancelled"]);
const RETRYABLE_STATES = new Set(["failed", "cancelled"]);
const ACTIVE_STATES = new Set(["assigned", "running", "progressing", "retrying"]);
const RUNNING_STATES = new Set(["assigned", "running", "progressing"]);    // an attempt under way now
const MAX_ROWS = 200;                   // the jobs shown (those running, then the newest); the rest are counted
const EVENTS_PAGE = 1000;               // GetEvents' page: a full one means there may be more
const HEALTH_INTERVAL_MS = 5000;
const DETAILS_REFRESH_MS = 2000;        // at most this often while the shown job changes
const PROPERTIES_IFACE = "org.freedesktop.DBus.Properties";
const OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager";
const WORKERS_PATH = MANAGER_PATH + "/worker";

// superuser "try": administrators get polkit-authorized actions; everyone else still sees the page.
const DBUS_OPTIONS = { bus: "system", superuser: "try" };

// One connection per instance of the daemon (see connect()): when h2kd goes away, what its objects said
// goes with it, and a restarted h2kd is read afresh.
let client = null;
let manager = null;
// object path -> what is known of the job: its Job properties (all of them once `full`) and its path.
// ListJobs gives Id, Operation, State, Progress, Owner, Priority and CreatedAt of every job; signals keep them
// current; GetAll fills in the rest for the jobs that are shown.
let jobs = {};
let workers = {};                       // object path -> Worker properties, path
let daemonOwner;                        // unique bus name of the h2kd we show; null when none runs

const $ = id => document.getElementById(id);
// Who is logged in to Cockpit: with administrative access every call is root's, so the job's audit says who.
let sessionUser = "";
const sessionUserKnown = Promise.resolve(cockpit.user()).then(user => { sessionUser = user.name || ""; }, () => {});
const userNames = new Map();            // uid -> login name, from /etc/passwd

/* ---------------------------------------------------------------- formatting */

function formatBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = Number(n) || 0;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
        value /= 1024;
        unit++;
    }
    return (unit === 0 ? String(value) : value.toFixed(value < 10 ? 1 : 0)) + " " + units[unit];
}

function formatDuration(seconds) {
    if (!Number.isFinite(seconds))
        return "—";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60)
        return cockpit.format(_("$0 s"), s);
    if (s < 3600)
        return cockpit.format(_("$0 min $1 s"), Math.floor(s / 60), s % 60);
    if (s < 86400)
        return cockpit.format(_("$0 h $1 min"), Math.floor(s / 3600), Math.floor((s % 3600) / 60));
    return cockpit.format(_("$0 d $1 h"), Math.floor(s / 86400), Math.floor((s % 86400) / 3600));
}

// D-Bus times are microseconds since the epoch; 0 means "not yet". A time past what a Date holds (h2kd caps an
// expected end at 2^63-1) is not known either.
function usecToDate(usec) {
    if (!usec)
        return null;
    const date = new Date(Number(usec) / 1000);
    return Number.isFinite(date.getTime()) ? date : null;
}

function formatAge(usec) {
    const date = usecToDate(usec);
    return date ? formatDuration((Date.now() - date.getTime()) / 1000) : "—";
}

function formatTime(usec) {
    const date = usecToDate(usec);
    return date ? date.toLocaleString() : "—";
}

function ownerName(uid) {
    const name = userNames.get(Number(uid));
    return name ? name : cockpit.format(_("uid $0"), uid);
}

function basename(path) {
    const parts = String(path || "").split("/");
    return parts[parts.length - 1] || path || "";
}

// With Cockpit's "Limited access" every call is the user's own, and polkit wants an administrator for most of
// h2kd's actions; root is never asked. h2kd says polkit refused with InteractiveAuthorizationRequired (a password
// would do), or with AccessDenied and "Not authorized to <what> (polkit action <id>)" (h2kd/bus/auth.py). Other
// AccessDenied errors are h2kd's own rules, which administrators are held to as well (an output outside the
// output directories), and a refusal followed by ": <reason>" is polkit giving no answer, to be tried again.
const INTERACTIVE_AUTHORIZATION_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";
const ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied";
const POLKIT_REFUSAL = /^Not authorized to .*\(polkit action org\.hyper2kvm\.h2kd1\.[a-z0-9-]+\)$/s;

function needsAdmin(error) {
    if (!error)
        return false;
    return error.name === INTERACTIVE_AUTHORIZATION_REQUIRED ||
        (error.name === ACCESS_DENIED && POLKIT_REFUSAL.test(String(error.message || "")));
}

function turnOnAdmin() {
    return _("Turn on administrative access with Cockpit's “Limited access” button at the top of the page, then try again.");
}

function daemonSaid(error) {
    return error.message || error.name;
}

function errorText(error) {
    if (!error)
        return _("Unknown error");
    if (needsAdmin(error))
        return [_("This needs administrative access."), turnOnAdmin(),
                cockpit.format(_("(h2kd: $0)"), daemonSaid(error))].join(" ");
    return error.message || cockpit.message(error) || String(error);
}

// What a page acts on rather than shows, in text others chose (paths, errors quoting a guest's names, journal
// lines): the bidirectional overrides and isolates, which turn the rest of a line around ("...\u202ekdmv.exe"
// reads "...exe.vmdk"), and controls but tab and newline. Shown as escapes, as h2kctl shows them.
const UNSHOWN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;

function visible(text) {
    return String(text).replace(UNSHOWN, c => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

function setText(node, text) {
    text = visible(text);
    // Rewriting a text with itself still replaces its node, which drops a selection made in it.
    if (node.textContent !== text)
        node.textContent = text;
}

function prettyJson(text) {
    try {
        const value = JSON.parse(text || "{}");
        if (value && typeof value === "object" && Object.keys(value).length === 0)
            return "";
        return JSON.stringify(value, null, 2);
    } catch (e) {
        return String(text || "");
    }
}

function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
        if (key === "class")
            node.className = value;
        else if (key === "text")
            node.textContent = visible(value);
        else if (key === "dataset")
            Object.assign(node.dataset, value);
        else if (key.startsWith("on"))
            node.addEventListener(key.slice(2), value);
        else if (value !== undefined && value !== null && value !== false)
            node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children)
        if (child !== null && child !== undefined)
            node.append(child);
    return node;
}

function setHidden(node, hidden) {
    if (node.hidden !== hidden) {
        // A button that disappears while focused would drop keyboard focus to <body>.
        if (hidden && node.contains(document.activeElement))
            node.dataset.lostFocus = "1";
        node.hidden = hidden;
    }
}

/* ---------------------------------------------------------------- alerts */

function showActionError(message) {
    const box = $("action-error");
    box.querySelector(".alert-text").textContent = visible(message);
    box.hidden = false;
}

$("action-error").querySelector(".alert-close").addEventListener("click", () => {
    $("action-error").hidden = true;
});

function showConnectionError(message) {
    const box = $("connection-error");
    box.textContent = visible(message);
    box.hidden = !message;
    $("submit-button").disabled = !!message;
}

/* ---------------------------------------------------------------- calls */

function notConnected() {
    return Promise.reject(new Error(_("h2kd is not running")));
}

function callJob(path, method, args = [], type = "") {
    return client ? client.call(path, JOB_IFACE, method, args, { type }) : notConnected();
}

function callManager(method, args = [], type = "") {
    return client ? client.call(MANAGER_PATH, MANAGER_IFACE, method, args, { type }) : notConnected();
}

// A cancel throws away the work done so far, and rows move as jobs come and go: the first press only asks
// ("Really cancel?"), and a second press of that same button within CONFIRM_MS cancels.
const CONFIRM_MS = 4000;

// Said to screen readers through a polite live region: the same words twice in a row are said again only
// if the region was emptied first, which takes a moment of its own.
function announce(text) {
    const region = $("announcer");
    region.textContent = "";
    window.setTimeout(() => { region.textContent = text; }, 100);
}

// Back to asking nothing; true if it was asking.
function unconfirm(button) {
    if (!button.dataset.confirming)
        return false;
    window.clearTimeout(Number(button.dataset.confirming));
    delete button.dataset.confirming;
    button.textContent = button.dataset.label;
    // A fixed aria-label would be read instead of the text: it follows the text, there and back.
    if (button.dataset.ariaLabel !== undefined) {
        button.setAttribute("aria-label", button.dataset.ariaLabel);
        delete button.dataset.ariaLabel;
    }
    return true;
}

function confirmedPress(button, jobId) {
    if (unconfirm(button))
        return true;
    button.dataset.label = button.textContent;
    button.textContent = _("Really cancel?");
    if (button.hasAttribute("aria-label")) {
        button.dataset.ariaLabel = button.getAttribute("aria-label");
        button.setAttribute("aria-label", cockpit.format(_("Really cancel job $0?"), jobId));
    }
    announce(cockpit.format(_("Really cancel job $0? Press the button again within $1 seconds to cancel it."),
                            jobId, CONFIRM_MS / 1000));
    button.dataset.confirming = String(window.setTimeout(() => unconfirm(button), CONFIRM_MS));
    return false;
}

function cancelJob(job) {
    const id = job.Id;
    return callJob(job.path, "Cancel").catch(e => {
        showActionError(cockpit.format(_("Cannot cancel job $0: $1"), id, errorText(e)));
    });
}

function startJob(job) {
    const id = job.Id;
    return callManager("StartJob", [id], "s").catch(e => {
        showActionError(cockpit.format(_("Cannot start job $0: $1"), id, errorText(e)));
    });
}

function retryJob(job) {
    const id = job.Id;
    return callJob(job.path, "Retry").catch(e => {
        showActionError(cockpit.format(_("Cannot retry job $0: $1"), id, errorText(e)));
    });
}

/* ---------------------------------------------------------------- job list */

const rows = new Map();                 // object path -> { row, cells... }

function jobMatchesFilter(job) {
    const filter = $("job-filter").value;
    const state = job.State;
    if (filter === "active")
        return !FINAL_STATES.has(state);
    if (filter === "finished")
        return FINAL_STATES.has(state);
    if (filter === "failed")
        return RETRYABLE_STATES.has(state);
    return true;
}

// Running jobs first, so that a batch of hundreds queued after them does not push them off the list; then the
// newest.
function runningThenNewest(a, b) {
    return (RUNNING_STATES.has(b.State) - RUNNING_STATES.has(a.State)) ||
        (Number(b.CreatedAt) - Number(a.CreatedAt)) || String(a.Id).localeCompare(String(b.Id));
}

function rowButton(classes, label, text, onclick) {
    return el("button", { type: "button", class: "btn btn-small " + classes, "aria-label": label, text, onclick });
}

function createRow(job) {
    const id = job.Id;
    const bar = el("div", {
        class: "progress-bar",
        role: "progressbar",
        "aria-valuemin": "0",
        "aria-valuemax": "100",
        "aria-label": cockpit.format(_("Progress of job $0"), id),
    }, el("div", { class: "progress-fill" }));
    const entry = {
        job,
        row: el("tr", { dataset: { path: job.path, jobId: id } }),
        state: el("span", { class: "label job-state" }),
        phase: el("div", { class: "sub job-phase" }),
        bar,
        fill: bar.firstChild,
        percent: el("span", { class: "progress-value" }),
        info: el("div", { class: "sub progress-info" }),
        owner: el("td", { "data-label": _("Owner"), class: "job-owner" }),
        age: el("td", { "data-label": _("Age"), class: "job-age" }),
        what: el("div", { class: "sub job-what" }),
        cancel: rowButton("btn-danger job-cancel", cockpit.format(_("Cancel job $0"), id), _("Cancel"),
                          event => confirmedPress(event.currentTarget, id) && cancelJob(job)),
        retry: rowButton("btn-secondary job-retry", cockpit.format(_("Retry job $0"), id), _("Retry"),
                         () => retryJob(job)),
        start: rowButton("btn-secondary job-start", cockpit.format(_("Start job $0"), id), _("Start"),
                         () => startJob(job)),
    };
    entry.details = el("button", {
        type: "button",
        class: "btn btn-link job-link",
        "aria-controls": "details-card",
        "aria-label": cockpit.format(_("Details of job $0"), id),
        text: id,
        onclick: () => showDetails(job.path, true),
    });
    entry.row.append(
        el("td", { "data-label": _("Job"), class: "job-id" }, entry.details, entry.what),
        el("td", { "data-label": _("State") }, entry.state, entry.phase),
        el("td", { "data-label": _("Progress"), class: "col-progress" },
           el("div", { class: "progress" }, bar, entry.percent), entry.info),
        entry.owner,
        entry.age,
        el("td", { "data-label": _("Actions"), class: "actions" },
           el("div", { class: "row-actions" }, entry.start, entry.cancel, entry.retry)),
    );
    return entry;
}

// A failure's message may run to kilobytes (quoting a file's names): in the list, its first line, cut; in full in
// the row's tooltip and in the job's details.
const LISTED_MESSAGE_CHARS = 200;

function shortened(message) {
    const first = String(message).trim().split("\n")[0];
    const more = first.length > LISTED_MESSAGE_CHARS || first.length < String(message).trim().length;
    return first.slice(0, LISTED_MESSAGE_CHARS).trimEnd() + (more ? "…" : "");
}

function progressText(job, now) {
    const state = job.State;
    if (state === "validated")
        return _("Held: stored without queueing, it starts when started");
    if (state === "queued" || state === "created" || state === "retrying")
        return job.WaitReason ? cockpit.format(_("Waiting: $0"), job.WaitReason) : _("Waiting to start");
    const parts = [];
    const [code, message] = Array.isArray(job.Error) ? job.Error : ["", ""];
    if (state === "failed" && (code || message))     // why, in the list: triage without opening each job
        parts.push(message ? cockpit.format("$0: $1", code, shortened(message)) : code);
    if (Number(job.BytesTotal) > 0)
        parts.push(cockpit.format(_("$0 of $1"), formatBytes(job.BytesDone), formatBytes(job.BytesTotal)));
    if (!FINAL_STATES.has(state)) {
        if (Number(job.Rate) > 0)
            parts.push(cockpit.format(_("$0/s"), formatBytes(job.Rate)));
        const end = usecToDate(job.ExpectedEndTime);
        const left = end ? (end.getTime() - now) / 1000 : NaN;
        if (Number.isFinite(left))
            parts.push(left < 1 ? _("almost done") : cockpit.format(_("$0 left"), formatDuration(left)));
    } else if (job.StartedAt && job.FinishedAt) {
        parts.push(cockpit.format(_("took $0"),
                                  formatDuration((Number(job.FinishedAt) - Number(job.StartedAt)) / 1e6)));
    }
    return parts.join(" · ");
}

function updateRow(entry) {
    const job = entry.job;
    const state = job.State || "";
    const now = Date.now();

    entry.state.textContent = state;
    entry.state.className = "label job-state state-" + state;
    // A retrying job waits for its next attempt: the failed attempt's phase and bar are not news.
    entry.phase.textContent = visible(RUNNING_STATES.has(state) && job.Phase ? job.Phase : "");
    entry.what.textContent = visible([job.Operation, basename(job.Source)].filter(Boolean).join(" · "));
    entry.what.title = visible(job.Source || "");

    let percent = null;
    if (state === "completed")
        percent = 100;
    else if (job.ProgressKnown || FINAL_STATES.has(state))
        percent = Math.max(0, Math.min(100, Math.floor(Number(job.Progress || 0) * 100)));
    else if (!RUNNING_STATES.has(state))
        percent = 0;
    const bar = entry.bar;
    bar.className = "progress-bar" + (percent === null ? " indeterminate" : "") +
        (state === "completed" ? " success" : "") + (RETRYABLE_STATES.has(state) ? " danger" : "");
    if (percent === null) {
        bar.removeAttribute("aria-valuenow");
        bar.setAttribute("aria-valuetext", _("in progress, size unknown"));
        entry.fill.style.width = "";
        entry.percent.textContent = "";
    } else {
        if (bar.getAttribute("aria-valuenow") !== String(percent))
            bar.setAttribute("aria-valuenow", String(percent));
        bar.removeAttribute("aria-valuetext");
        entry.fill.style.width = percent + "%";
        entry.percent.textContent = percent + " %";
    }
    entry.info.textContent = visible(progressText(job, now));
    entry.info.title = state === "failed" && Array.isArray(job.Error) ? visible(job.Error[1] || "") : "";
    entry.owner.textContent = ownerName(job.Owner);
    entry.owner.title = cockpit.format(_("uid $0"), job.Owner);
    entry.age.textContent = formatAge(job.CreatedAt);
    entry.age.title = formatTime(job.CreatedAt);

    setHidden(entry.cancel, !job.Cancelable);
    setHidden(entry.retry, !RETRYABLE_STATES.has(state));
    setHidden(entry.start, state !== "validated");
    const buttons = [entry.start, entry.cancel, entry.retry];
    entry.cancel.parentNode.parentNode.classList.toggle("no-actions", buttons.every(b => b.hidden));
    for (const button of buttons) {
        if (button.dataset.lostFocus) {
            delete button.dataset.lostFocus;
            const next = buttons.find(b => !b.hidden) || entry.details;
            next.focus();
        }
    }
}

// Put the rows of the newest matching jobs in place, moving existing rows only when the order changed,
// so that a focused button keeps its focus while the list updates.
function reconcileRows() {
    const all = Object.values(jobs);
    const matching = all.filter(jobMatchesFilter).sort(runningThenNewest);
    const newest = matching.slice(0, MAX_ROWS);
    for (const job of newest) {
        if (!job.full)
            readJob(job);               // its row comes once it is read (reconciled again then)
    }
    const shown = newest.filter(job => job.full);
    const wanted = new Set(shown.map(job => job.path));
    for (const [path, entry] of rows) {
        if (!wanted.has(path)) {
            entry.row.remove();
            rows.delete(path);
        }
    }
    const body = $("jobs-body");
    shown.forEach((job, index) => {
        let entry = rows.get(job.path);
        if (!entry) {
            entry = createRow(job);
            rows.set(job.path, entry);
            updateRow(entry);
        }
        const here = body.children[index];
        if (here !== entry.row)
            body.insertBefore(entry.row, here || null);
    });
    $("jobs-table").hidden = shown.length === 0;
    $("jobs-empty").hidden = shown.length > 0;
    if (!client)                        // the banner says why
        $("jobs-empty").textContent = nameOwner
            ? _("The jobs are not known while h2kd cannot be reached.")
            : _("The jobs are not known while h2kd is not running.");
    else if (!jobsListed || newest.length > 0)
        $("jobs-empty").textContent = _("Loading the job list…");
    else
        $("jobs-empty").textContent = all.length === 0 ? _("No jobs.") : _("No jobs match this filter.");
    const more = $("jobs-more");
    more.hidden = matching.length <= MAX_ROWS;
    more.textContent = cockpit.format(_("Showing $0 of $1 jobs: those running, then the newest."), MAX_ROWS,
                                      matching.length);
}

let reconcileQueued = false;
function scheduleReconcile() {
    if (!reconcileQueued) {
        reconcileQueued = true;
        window.setTimeout(() => {
            reconcileQueued = false;
            reconcileRows();
        }, 0);
    }
}

function jobAdded(job) {
    scheduleReconcile();
    if (job.path === selectedPath)
        renderDetails();
}

// names: the properties that changed (null: any of them)
function jobChanged(job, names) {
    const entry = rows.get(job.path);
    if (entry) {
        updateRow(entry);
        if (!jobMatchesFilter(job))
            scheduleReconcile();
    } else if (!names || names.includes("State")) {
        scheduleReconcile();            // only a new state can bring a job that is not shown into view
    }
    if (job.path === selectedPath)
        detailsChanged(job);
}

function jobRemoved(job) {
    scheduleReconcile();
    if (job.path === selectedPath) {
        // Its id is free again: a job submitted under it takes this path, with a history and a journal of its own.
        forgetShownHistory();
        renderDetails();
    }
}

$("job-filter").addEventListener("change", reconcileRows);

/* ---------------------------------------------------------------- details */

// While a job runs, its details change several times a second. What did not change is left as it is, and what did
// is written in place: a text rewritten, even with itself, loses any selection the user made in it.
let selectedPath = null;
let selectedEvents = [];
let lastEventSeq = 0;
let historyShown = 0;                   // of selectedEvents, those in the list already: the rest are appended
let historyRun = null;                  // the list's last line when it sums up progress events, which extends it
let lastDetailsState = null;
let detailsTimer = null;
let detailsLastLoad = 0;

function selectedJob() {
    return selectedPath && Object.prototype.hasOwnProperty.call(jobs, selectedPath) ? jobs[selectedPath] : undefined;
}

function forgetShownHistory() {
    selectedEvents = [];
    lastEventSeq = 0;
    historyShown = 0;
    historyRun = null;
    lastDetailsState = null;
    $("details-history").replaceChildren();
    $("details-journal").textContent = "";
}

function showDetails(path, focus) {
    if (path !== selectedPath) {
        unconfirm($("details-cancel"));    // a press asked about the job shown before, not this one
        selectedPath = path;
        forgetShownHistory();
        $("result-section").open = false;
    }
    for (const entry of rows.values())
        entry.row.classList.toggle("selected", entry.job.path === path);
    $("details-card").hidden = false;
    forgetSpecAndResult(selectedJob());    // opened by the user: read afresh
    renderDetails();
    loadHistoryAndJournal();
    if (focus)
        $("details-card").focus();
}

function closeDetails() {
    const path = selectedPath;
    selectedPath = null;
    $("details-card").hidden = true;
    for (const entry of rows.values())
        entry.row.classList.remove("selected");
    const entry = rows.get(path);
    if (entry)
        entry.details.focus();
}

// facts: [label, value, class]. The same labels as shown: only the values that differ are written.
function renderFacts(facts) {
    const list = $("details-facts");
    const shown = list.children;
    const sameLabels = shown.length === facts.length &&
        facts.every(([label, , cls], i) => shown[i].dataset.fact === label && shown[i].className === (cls || ""));
    if (!sameLabels) {
        list.replaceChildren(...facts.map(([label, value, cls]) =>
            el("div", { class: cls || "", dataset: { fact: label } }, el("dt", { text: label }),
               el("dd", { text: value }))));
        return;
    }
    facts.forEach(([, value], i) => setText(shown[i].lastChild, value));
}

function renderDetails() {
    const job = selectedJob();
    if (job && !job.full) {
        readJob(job);                   // rendered again once read
        return;
    }
    const removed = !job;
    $("details-removed").hidden = !removed;
    setText($("details-removed"), client ? _("This job was removed.") : _("h2kd is not running."));
    setHidden($("details-cancel"), removed || !job.Cancelable);
    setHidden($("details-retry"), removed || !RETRYABLE_STATES.has(job.State));
    for (const id of ["details-cancel", "details-retry"]) {
        const button = $(id);
        if (button.dataset.lostFocus) {
            delete button.dataset.lostFocus;
            $("details-refresh").focus();
        }
    }
    if (removed) {
        $("details-refresh").disabled = true;
        return;
    }
    $("details-refresh").disabled = false;
    const unread = EXPLICIT_JOB_PROPERTIES.filter(name => !(job.explicitReads && name in job.explicitReads));
    if (unread.length > 0)
        loadSpecAndResult(job, unread);     // rendered again once read
    setText($("details-title"), cockpit.format(_("Job $0"), job.Id));
    const percent = job.ProgressKnown || FINAL_STATES.has(job.State)
        ? Math.floor(Number(job.Progress || 0) * 100) + " %" : "—";
    const facts = [
        [_("State"), job.State],
        [_("Phase"), job.Phase || "—"],
        [_("Progress"), percent],
        [_("Operation"), job.Operation],
        [_("Source"), job.Source || "—", "wide"],
        [_("Output"), job.Output || "—", "wide"],
        [_("Priority"), String(job.Priority)],
        [_("Owner"), ownerName(job.Owner)],
        [_("Attempt"), String(job.Attempt)],
        [_("Worker"), job.Worker || "—"],
        [_("Unit"), job.Unit || "—", "wide"],
        [_("Created"), formatTime(job.CreatedAt)],
        [_("Started"), formatTime(job.StartedAt)],
        [_("Finished"), formatTime(job.FinishedAt)],
    ];
    if (job.WaitReason)
        facts.push([_("Waiting because"), job.WaitReason, "wide"]);
    renderFacts(facts);

    const [code, message] = Array.isArray(job.Error) ? job.Error : ["", ""];
    const errorBox = $("details-error");
    errorBox.hidden = !code && !message;
    setText(errorBox, code ? cockpit.format("$0: $1", code, message) : message);

    setText($("details-result"), job.ResultWithheld || prettyJson(job.Result) || _("No result yet."));
    setText($("details-spec"), job.SpecWithheld || prettyJson(job.Spec));
}

function detailsChanged(job) {
    renderDetails();
    if (job.State !== lastDetailsState) {
        loadHistoryAndJournal();        // a new state is worth showing at once
    } else if (!detailsTimer) {
        const wait = Math.max(0, detailsLastLoad + DETAILS_REFRESH_MS - Date.now());
        detailsTimer = window.setTimeout(loadHistoryAndJournal, wait);
    }
}

function describeEvent(kind, data) {
    if (kind === "state") {
        const text = cockpit.format(_("$0 → $1"), data.old_state || "—", data.new_state);
        return data.reason ? text + ": " + data.reason : text;
    }
    if (kind === "log")
        return String(data.message || "");
    if (kind === "result") {
        const error = data.error;
        return error ? cockpit.format(_("result: $0 ($1: $2)"), data.status, error.code, error.message)
            : cockpit.format(_("result: $0"), data.status);
    }
    return JSON.stringify(data);
}

function progressRunText(run) {
    return run.count > 1
        ? cockpit.format(_("progress $0 → $1 ($2 updates; $3)"), run.first, run.last, run.count,
                         run.phases.join(", "))
        : cockpit.format(_("progress $0"), run.first);
}

// Consecutive progress events become one line ("progress 6 % → 100 %"), the rest one line each. The events not
// in the list yet are added to it; the lines already there stay, but for a progress line that the new events extend.
function renderHistory() {
    const list = $("details-history");
    if (list.dataset.failed) {
        delete list.dataset.failed;
        list.replaceChildren();
        historyShown = 0;
        historyRun = null;
    }
    const items = [];
    for (const [seq, time, kind, data] of selectedEvents.slice(historyShown)) {
        if (kind === "progress") {
            const pct = typeof data.progress === "number" && data.progress >= 0
                ? Math.floor(data.progress * 100) + " %" : "?";
            if (!historyRun) {
                const node = el("li", { class: "event-progress", dataset: { seq: String(seq) } },
                                el("time", { text: formatTime(time) }), el("span"));
                historyRun = { first: pct, last: pct, count: 0, phases: [], node };
                items.push(node);
            }
            historyRun.last = pct;
            historyRun.count++;
            if (data.phase && !historyRun.phases.includes(data.phase))
                historyRun.phases.push(data.phase);
            continue;
        }
        if (historyRun)
            setText(historyRun.node.lastChild, progressRunText(historyRun));
        historyRun = null;
        items.push(el("li", { class: "event-" + kind, dataset: { seq: String(seq), kind } },
                      el("time", { text: formatTime(time) }), el("span", { text: describeEvent(kind, data) })));
    }
    if (historyRun)
        setText(historyRun.node.lastChild, progressRunText(historyRun));
    historyShown = selectedEvents.length;
    list.append(...items);
}

function loadHistory(job) {
    const path = job.path;
    return callJob(path, "GetEvents", [lastEventSeq], "t").then(([events]) => {
        if (path !== selectedPath)
            return;
        for (const [seq, time, kind, dataText] of events) {
            if (seq <= lastEventSeq)
                continue;
            let data;
            try {
                data = JSON.parse(dataText);
            } catch (e) {
                data = { message: dataText };
            }
            selectedEvents.push([seq, time, kind, data]);
            lastEventSeq = seq;
        }
        if (historyShown < selectedEvents.length || $("details-history").dataset.failed)
            renderHistory();
        if (events.length >= EVENTS_PAGE)
            return loadHistory(job);
    }).catch(e => {
        if (path !== selectedPath)
            return;
        const list = $("details-history");
        const text = errorText(e);
        if (!list.dataset.failed || list.textContent !== text)
            list.replaceChildren(el("li", { class: "error", text }));
        list.dataset.failed = "1";
    });
}

function loadJournal(job) {
    const path = job.path;
    // --reverse: with --since, journalctl 252 gives the first --lines after it, not the last.
    const argv = ["journalctl", "--no-pager", "--quiet", "--output=cat", "--reverse", "--lines=20",
                  "H2K_JOB_ID=" + job.Id, "_UID=0"];   // lines root wrote only: anyone may log one with any H2K_JOB_ID
    const created = Math.floor(Number(job.CreatedAt) / 1e6);
    if (created > 0)            // not those of an earlier job of this id, removed since
        argv.push("--since=@" + created);
    return cockpit.spawn(argv, { superuser: "try", err: "message" }).then(output => {
        const lines = output.trim() ? output.trim().split("\n").reverse() : [];
        if (path === selectedPath)
            setText($("details-journal"), lines.join("\n") || _("No journal entries."));
    }).catch(e => {
        if (path === selectedPath)
            setText($("details-journal"), cockpit.format(_("Cannot read the journal: $0"), errorText(e)));
    });
}

function loadHistoryAndJournal() {
    if (detailsTimer) {
        window.clearTimeout(detailsTimer);
        detailsTimer = null;
    }
    const job = selectedJob();
    if (!job)
        return;
    lastDetailsState = job.State;
    detailsLastLoad = Date.now();
    loadHistory(job);
    loadJournal(job);
}

// Spec and Result are read when the job's details are shown, and again only when h2kd says they changed: a new
// Spec comes with its value, a new Result by its name only (see propertiesChanged). Another user's job's Result
// is for its owner and administrators: h2kd refuses it to others, and says why.
// job.explicitReads: property name -> the number of the read that gives its value; an answer to an older read
// is not used.
let lastExplicitRead = 0;

function forgetSpecAndResult(job) {
    if (job)
        job.explicitReads = {};
}

function loadSpecAndResult(job, names) {
    const path = job.path;
    const connection = client;
    if (!connection)
        return;
    const read = ++lastExplicitRead;
    job.explicitReads = job.explicitReads || {};
    for (const name of names)
        job.explicitReads[name] = read;
    Promise.all(names.map(name =>
        connection.call(path, PROPERTIES_IFACE, "Get", [JOB_IFACE, name], { type: "ss" })
                .then(([value]) => ({ value: value.v }), e => ({ error: errorText(e) })))).then(replies => {
        if (connection !== client || jobs[path] !== job)
            return;
        let changed = false;
        names.forEach((name, i) => {
            if (job.explicitReads[name] !== read)
                return;
            job[name] = replies[i].value;
            job[name + "Withheld"] = replies[i].error;
            changed = true;
        });
        if (changed && path === selectedPath)
            renderDetails();
    });
}

// A property h2kd announced: given its value, or only its name (invalidated).
function explicitChanged(job, changed, invalidated) {
    if (!job.explicitReads)
        return;                         // never read: read in full when shown
    for (const name of EXPLICIT_JOB_PROPERTIES) {
        if (name in changed) {
            job.explicitReads[name] = ++lastExplicitRead;
            job[name + "Withheld"] = undefined;
        } else if (invalidated.includes(name)) {
            delete job.explicitReads[name];
        }
    }
}

$("details-close").addEventListener("click", closeDetails);
$("details-refresh").addEventListener("click", () => {
    forgetSpecAndResult(selectedJob());
    renderDetails();
    loadHistoryAndJournal();
});
$("details-cancel").addEventListener("click", event => {
    const job = selectedJob();
    if (job && confirmedPress(event.currentTarget, job.Id))
        cancelJob(job);
});
$("details-retry").addEventListener("click", () => {
    const job = selectedJob();
    if (job)
        retryJob(job);
});

/* ---------------------------------------------------------------- submitting */

function buildSpec(form) {
    const v = cockpit.variant;
    const source = form.source.value.trim();
    const output = form.output.value.trim();
    const format = form.format.value;
    const priority = Number.parseInt(form.priority.value, 10);
    const parameters = { output_format: v("s", format) };
    if (form.compress.checked && format === "qcow2")
        parameters.compress = v("b", true);
    if (form.verify.checked)
        parameters.verify = v("b", true);
    const spec = {
        operation: v("s", "convert"),
        image: v("a{sv}", { path: v("s", source) }),
        parameters: v("a{sv}", parameters),
        execution_policy: v("a{sv}", { priority: v("u", priority) }),
        audit: v("a{sv}", { tags: v("as", ["cockpit"]), ...(sessionUser && { requested_by: v("s", sessionUser) }) }),
    };
    if (output)
        spec.artifacts = v("a{sv}", { output_path: v("s", output) });
    return spec;
}

function shortErrorName(name) {
    return name ? String(name).split(".").pop() : "";
}

$("output-format").addEventListener("change", () => {
    const qcow2 = $("output-format").value === "qcow2";
    $("compress").disabled = !qcow2;
    if (!qcow2)
        $("compress").checked = false;
});

$("submit-form").addEventListener("submit", event => {
    event.preventDefault();
    const form = event.target;
    const button = $("submit-button");
    const errorBox = $("submit-error");
    const status = $("submit-status");
    errorBox.hidden = true;
    errorBox.textContent = "";
    status.hidden = true;
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    const refused = (name, message, jobId) => {
        errorBox.replaceChildren(
            el("strong", { text: name ? cockpit.format(_("h2kd refused the job ($0):"), name)
                                      : _("The job could not be submitted:") }),
            " ",
            el("span", { class: "daemon-message", text: message }),
            ...(jobId ? [el("span", { class: "sub", text: " " + cockpit.format(_("(job $0)"), jobId) })] : []));
        errorBox.dataset.jobId = jobId || "";
        errorBox.hidden = false;
    };
    sessionUserKnown.then(() => callManager("SubmitJob", [buildSpec(form), {}], "a{sv}a{sv}")).then(([id, path]) => {
        status.dataset.jobId = id;
        status.dataset.path = path;
        const submitted = () => {
            status.textContent = cockpit.format(_("Job $0 submitted."), id);
            status.hidden = false;
        };
        // The job exists from here on, whatever happens to the calls after this one: saying it could not
        // be submitted would have it submitted twice. Its row comes with the list, whose signals or reads
        // bring it once they can.
        if (!client) {
            submitted();
            return;
        }
        // The host checks (source exists, output allowed, ...) run at submission: a job that failed
        // them is already final, and its error belongs next to the form like any other refusal.
        return client.call(path, PROPERTIES_IFACE, "GetAll", [JOB_IFACE], { type: "s" }).then(([props]) => {
            const state = props.State ? props.State.v : "";
            const [code, message] = props.Error ? props.Error.v : ["", ""];
            const attempt = props.Attempt ? Number(props.Attempt.v) : 0;
            if (state === "failed" && attempt === 0)
                refused(code, message, id);
            else
                submitted();
        }, submitted);
    }, e => {
        if (needsAdmin(e)) {
            // The daemon's own words stay in view: an administrator's polkit rule names the action they give.
            errorBox.replaceChildren(
                el("strong", { text: _("Starting a conversion needs administrative access.") }),
                " ", turnOnAdmin(), " ",
                el("span", { class: "sub" }, _("h2kd said:"), " ",
                   el("span", { class: "daemon-message", text: daemonSaid(e) })));
            errorBox.dataset.jobId = "";
            errorBox.hidden = false;
        } else {
            refused(shortErrorName(e.name), errorText(e));
        }
    }).finally(() => {
        button.disabled = !$("connection-error").hidden;
        form.removeAttribute("aria-busy");
    });
});

/* ---------------------------------------------------------------- queue and health */

function renderQueue() {
    if (!manager || !manager.valid) {
        for (const id of ["queue-state", "jobs-running", "jobs-queued", "max-parallel"])
            $(id).textContent = "—";
        $("queue-state").className = "";
        $("daemon-version").textContent = "";     // else the last h2kd's version would pass for a running one's
        setHidden($("pause-button"), true);
        setHidden($("resume-button"), true);
        return;
    }
    const paused = !!manager.Paused;
    $("queue-state").textContent = paused ? _("Paused: queued jobs wait") : _("Running queued jobs");
    $("queue-state").className = paused ? "state-paused" : "";
    $("jobs-running").textContent = String(manager.JobsRunning);
    $("jobs-queued").textContent = String(manager.JobsQueued);
    $("max-parallel").textContent = String(manager.MaxParallelJobs);
    $("daemon-version").textContent = cockpit.format(_("h2kd $0"), manager.Version);
    const pause = $("pause-button");
    const resume = $("resume-button");
    setHidden(pause, paused);
    setHidden(resume, !paused);
    for (const [gone, other] of [[pause, resume], [resume, pause]]) {
        if (gone.dataset.lostFocus) {
            delete gone.dataset.lostFocus;
            other.focus();
        }
    }
}

function queueAction(method, failed) {
    return callManager(method).catch(e => {
        showActionError(cockpit.format(failed, errorText(e)));
    });
}

$("pause-button").addEventListener("click", () => queueAction("PauseQueue", _("Cannot pause the queue: $0")));
$("resume-button").addEventListener("click", () => queueAction("ResumeQueue", _("Cannot resume the queue: $0")));

function renderHealth(health) {
    const value = key => (health[key] && "v" in health[key] ? health[key].v : health[key]);
    const status = value("status") || "unknown";
    const label = $("health-status");
    label.textContent = status;
    label.className = "label " + (status === "ok" ? "state-completed" : "state-failed");
    const problems = [];
    if (value("store_ok") === false)
        problems.push(_("the job store is not usable"));
    if (Number(value("jobs_unreadable")) > 0)
        problems.push(cockpit.format(_("$0 stored jobs cannot be read (the journal names them)"),
                                     value("jobs_unreadable")));
    if (value("systemd_reachable") === false)
        problems.push(_("systemd cannot be reached"));
    if (Number(value("workers_stale")) > 0)
        problems.push(cockpit.format(_("$0 stale workers"), value("workers_stale")));
    $("health-problems").textContent = problems.join("; ");
    $("health-uptime").textContent = formatDuration(Number(value("uptime_seconds") || 0));
    $("health-active").textContent = String(value("jobs_active"));
    $("health-store").textContent = value("store_ok") ? _("ok") : _("failing");
    $("health-systemd").textContent = value("systemd_reachable") ? _("reachable") : _("unreachable");
}

let healthTimer = null;
function refreshHealth() {
    if (healthTimer)
        window.clearTimeout(healthTimer);
    healthTimer = window.setTimeout(refreshHealth, HEALTH_INTERVAL_MS);
    return callManager("GetHealth").then(([health]) => {
        renderHealth(health);
    }).catch(e => {
        $("health-status").textContent = _("unknown");
        $("health-status").className = "label";
        $("health-problems").textContent = errorText(e);
    });
}


/* ---------------------------------------------------------------- workers */

function renderWorkers() {
    const list = Object.keys(workers).map(path => workers[path]).filter(w => w.Id)
        .sort((a, b) => String(a.Name).localeCompare(String(b.Name)));
    const body = $("workers-body");
    body.replaceChildren(...list.map(worker => {
        let operations = "—";
        try {
            const caps = JSON.parse(worker.Capabilities || "{}");
            if (Array.isArray(caps.operations))
                operations = caps.operations.join(", ");
        } catch (e) {
            // capabilities that are not JSON are shown as "—"
        }
        const limit = Number(worker.MaxJobs) > 0 ? String(worker.MaxJobs) : "∞";
        return el("tr", { dataset: { workerId: worker.Id } },
                  el("td", { "data-label": _("Name"), text: worker.Name || worker.Id }),
                  el("td", { "data-label": _("Kind"), text: worker.Kind }),
                  el("td", { "data-label": _("State") },
                     el("span", { class: "label worker-state state-" + worker.State, text: worker.State })),
                  el("td", { "data-label": _("Jobs"), text: cockpit.format("$0 / $1", worker.ActiveJobs, limit) }),
                  el("td", { "data-label": _("Operations"), text: operations }),
                  el("td", { "data-label": _("Last heartbeat"),
                             text: worker.LastHeartbeat ? cockpit.format(_("$0 ago"), formatAge(worker.LastHeartbeat))
                                 : "—" }));
    }));
    $("workers-table").hidden = list.length === 0;
    $("workers-empty").hidden = list.length > 0;
}

let workersQueued = false;
function scheduleWorkers() {
    if (!workersQueued) {
        workersQueued = true;
        window.setTimeout(() => {
            workersQueued = false;
            renderWorkers();
        }, 0);
    }
}


/* ---------------------------------------------------------------- following the daemon's objects */

const LIST_RETRY_MS = 5000;
const READ_RETRY_MS = 1000;             // a job whose GetAll failed is read again after this, doubled each time
const READ_RETRY_MAX_MS = 30000;
let jobsListed = false;                 // ListJobs has answered on this connection
let pendingReads = 0;                   // GetAll calls of jobs not answered yet

function unwrapped(properties) {
    const values = {};
    for (const name of Object.keys(properties || {}))
        values[name] = properties[name].v;
    return values;
}

// One ListJobs row: id, operation, state, progress (-1 while unknown), owner, priority, created_at, path.
function applyListRow(job, [id, operation, state, progress, owner, priority, createdAt]) {
    Object.assign(job, { Id: id, Operation: operation, State: state, Owner: owner, Priority: priority,
                         CreatedAt: createdAt, ProgressKnown: progress >= 0 });
    if (progress >= 0)
        job.Progress = progress;
    else if (!job.full)
        job.Progress = 0;
}

function loadJobs(connection) {
    connection.call(MANAGER_PATH, MANAGER_IFACE, "ListJobs", [{}], { type: "a{sv}" }).then(([list]) => {
        if (connection !== client)
            return;
        // The reply is newer than every signal received before it, so it says which jobs there are;
        // signals received after it are newer still.
        const listed = {};
        for (const row of list) {
            const path = row[7];
            const job = jobs[path] || { path, full: false };
            applyListRow(job, row);
            listed[path] = job;
        }
        jobs = listed;
        jobsListed = true;
        reconcileRows();
        if (selectedPath)
            renderDetails();
    }, e => {
        if (connection !== client)
            return;
        showActionError(cockpit.format(_("Cannot list the jobs: $0"), errorText(e)));
        window.setTimeout(() => {
            if (connection === client)
                loadJobs(connection);
        }, LIST_RETRY_MS);
    });
}

// All the job's properties, for its row and its details.
function readJob(job) {
    if (job.reading || job.readRetry || !client)
        return;
    const connection = client;
    job.reading = true;
    pendingReads++;
    const answered = () => {
        job.reading = false;
        if (connection !== client)
            return false;
        // The rows read together (a page's worth when the list loads) are put in place together.
        if (--pendingReads === 0)
            scheduleReconcile();
        return jobs[job.path] === job;
    };
    connection.call(job.path, PROPERTIES_IFACE, "GetAll", [JOB_IFACE]).then(([properties]) => {
        if (!answered())
            return;
        job.readFailures = 0;
        Object.assign(job, unwrapped(properties));
        job.full = true;
        if (rows.has(job.path) || job.path === selectedPath)
            jobChanged(job, []);
    }, () => {
        if (!answered())
            return;
        // A job removed meanwhile is dropped by its InterfacesRemoved. Any other failure would come back
        // at once if the job were read again right away (the reconcile that follows wants it), so it
        // waits, longer each time, while the other jobs are shown.
        const wait = Math.min(READ_RETRY_MAX_MS, READ_RETRY_MS * 2 ** (job.readFailures || 0));
        job.readFailures = (job.readFailures || 0) + 1;
        job.readRetry = window.setTimeout(() => {
            job.readRetry = null;
            if (connection !== client || jobs[job.path] !== job)
                return;
            scheduleReconcile();
            if (job.path === selectedPath)
                renderDetails();
        }, wait);
    });
}

function loadWorkers(connection) {
    connection.call(WORKERS_PATH, "org.freedesktop.DBus.Introspectable", "Introspect", []).then(([xml]) => {
        const node = new window.DOMParser().parseFromString(xml, "text/xml").documentElement;
        const paths = Array.from(node.children)
                .filter(child => child.tagName === "node" && child.getAttribute("name"))
                .map(child => WORKERS_PATH + "/" + child.getAttribute("name"));
        for (const path of paths) {
            // Recorded as each reply comes: a removal or change signalled after it then finds the worker.
            connection.call(path, PROPERTIES_IFACE, "GetAll", [WORKER_IFACE]).then(([properties]) => {
                if (connection !== client)
                    return;
                workers[path] = Object.assign(workers[path] || { path }, unwrapped(properties));
                scheduleWorkers();
            }, () => { /* unregistered meanwhile */ });
        }
    }, () => { /* no worker is registered */ });
}

// LastHeartbeat changes unannounced: read again now and then, or a live worker would look ever older.
function readHeartbeats() {
    const connection = client;
    if (!connection)
        return;
    // Drawn once, when every answer is in: the table is not rebuilt once per worker.
    Promise.all(Object.keys(workers).map(path =>
        connection.call(path, PROPERTIES_IFACE, "Get", [WORKER_IFACE, "LastHeartbeat"], { type: "ss" }).then(([value]) => {
            if (connection === client && workers[path])
                workers[path].LastHeartbeat = value.v;
        }, () => { /* unregistered meanwhile */ }))).then(() => {
        if (connection === client)
            scheduleWorkers();
    });
}

function objectAdded(path, interfaces) {
    if (interfaces[JOB_IFACE]) {
        const job = jobs[path] || { path };
        Object.assign(job, unwrapped(interfaces[JOB_IFACE]), { full: true });
        jobs[path] = job;
        jobAdded(job);
    }
    if (interfaces[WORKER_IFACE]) {
        workers[path] = Object.assign(workers[path] || { path }, unwrapped(interfaces[WORKER_IFACE]));
        scheduleWorkers();
    }
}

function objectRemoved(path, names) {
    const job = jobs[path];
    if (job && names.includes(JOB_IFACE)) {
        delete jobs[path];
        jobRemoved(job);
    }
    if (workers[path] && names.includes(WORKER_IFACE)) {
        delete workers[path];
        scheduleWorkers();
    }
}

function propertiesChanged(path, name, changed, invalidated) {
    if (name === JOB_IFACE && jobs[path]) {
        const job = jobs[path];
        Object.assign(job, unwrapped(changed));
        explicitChanged(job, changed, invalidated || []);
        jobChanged(job, Object.keys(changed).concat(invalidated || []));
    } else if (name === WORKER_IFACE && workers[path]) {
        Object.assign(workers[path], unwrapped(changed));
        scheduleWorkers();
    }
}

// Subscribed before anything is read, so that no change falls between a reply and its signals.
function followSignals(connection) {
    const mine = handler => (...args) => {
        if (connection === client)
            handler(...args);
    };
    connection.subscribe({ path: MANAGER_PATH, interface: OBJECT_MANAGER_IFACE, member: "InterfacesAdded" },
                         mine((path, iface, member, [objectPath, interfaces]) => objectAdded(objectPath, interfaces)));
    connection.subscribe({ path: MANAGER_PATH, interface: OBJECT_MANAGER_IFACE, member: "InterfacesRemoved" },
                         mine((path, iface, member, [objectPath, names]) => objectRemoved(objectPath, names)));
    connection.subscribe({ path_namespace: MANAGER_PATH, interface: PROPERTIES_IFACE, member: "PropertiesChanged" },
                         mine((path, iface, member, [name, changed, invalidated]) =>
                             propertiesChanged(path, name, changed, invalidated)));
}

/* ---------------------------------------------------------------- start */

function loadUserNames() {
    return cockpit.file("/etc/passwd").read().then(text => {
        for (const line of String(text || "").split("\n")) {
            const fields = line.split(":");
            if (fields.length > 2 && /^\d+$/.test(fields[2]))
                userNames.set(Number(fields[2]), fields[0]);
        }
        for (const entry of rows.values())
            updateRow(entry);
    }).catch(() => { /* uids are shown instead of names */ });
}

let ticks = 0;
function tick() {
    const now = Date.now();
    if (++ticks % 5 === 0)
        readHeartbeats();               // then draws the workers anew, with their heartbeats' ages
    for (const entry of rows.values()) {
        entry.age.textContent = formatAge(entry.job.CreatedAt);
        if (!FINAL_STATES.has(entry.job.State))
            entry.info.textContent = visible(progressText(entry.job, now));
    }
}

// Waits between attempts that keep failing: 1 s, doubled each time, at most 30 s.
const RECONNECT_MS = 1000;
const RECONNECT_MAX_MS = 30000;

function backoff() {
    let failures = 0;
    return {
        next: () => Math.min(RECONNECT_MAX_MS, RECONNECT_MS * 2 ** failures++),
        reset: () => { failures = 0; },
    };
}

function notRunning() {
    return _("h2kd is not running (nobody owns org.hyper2kvm.h2kd1 on the system bus).");
}

let watcher = null;                     // the channel that follows who owns BUS_NAME
let nameOwner;                          // who it last said owns it: undefined until it says
const watchBackoff = backoff();
const connectBackoff = backoff();
let reconnectTimer = null;

function connect(owner) {
    disconnect();
    daemonOwner = owner;
    client = cockpit.dbus(BUS_NAME, DBUS_OPTIONS);
    const connection = client;
    const proxy = client.proxy(MANAGER_IFACE, MANAGER_PATH);
    manager = proxy;
    manager.addEventListener("changed", renderQueue);
    followSignals(connection);
    connection.addEventListener("close", (event, options) => {
        if (connection !== client)
            return;
        // Whatever closed it, the page is not to stay without h2kd while one runs: it connects again, when the
        // watcher says who runs, less often each time the connection does not last.
        disconnect();
        showConnectionError(options.problem === "not-found"
            ? notRunning()
            : cockpit.format(_("The connection to h2kd was lost: $0"), cockpit.message(options)));
        window.clearTimeout(reconnectTimer);
        reconnectTimer = window.setTimeout(() => {
            reconnectTimer = null;
            if (!client && nameOwner)
                connect(nameOwner);
        }, connectBackoff.next());
    });
    proxy.wait().then(() => {
        if (connection !== client)
            return;
        if (!proxy.valid)
            throw new Error(_("the manager object is missing"));
        connectBackoff.reset();
        showConnectionError("");
        renderQueue();
    }).catch(e => {
        if (connection === client)
            showConnectionError(cockpit.format(_("Cannot reach h2kd (org.hyper2kvm.h2kd1 on the system bus): $0"),
                                               errorText(e)));
    });
    loadJobs(connection);
    loadWorkers(connection);
    refreshHealth();
}

function disconnect() {
    window.clearTimeout(reconnectTimer);
    reconnectTimer = null;
    const old = client;
    client = null;
    if (old)
        old.close();
    manager = null;
    jobs = {};
    workers = {};
    jobsListed = false;
    pendingReads = 0;
    for (const entry of rows.values())
        entry.row.remove();
    rows.clear();
    reconcileRows();
    renderWorkers();
    renderQueue();
    if (selectedPath)
        renderDetails();
}

function ownerChanged(owner) {
    nameOwner = owner;
    if (owner)
        watchBackoff.reset();
    if (owner === daemonOwner && (client || !owner))
        return;
    if (owner && daemonOwner === undefined && client) {
        daemonOwner = owner;        // the first connection was made before the owner was known
    } else if (owner) {
        connect(owner);
    } else {
        daemonOwner = null;
        disconnect();
        showConnectionError(notRunning());
    }
}

// This channel only watches who owns the name: each new h2kd gets a fresh data connection. When nobody owns the
// name and D-Bus cannot start h2kd, the bridge says so ("owner": null) and closes the channel ("not-found"):
// it would tell nothing more, so another one is opened after a while, to see h2kd once it is started.
function watchOwner() {
    const channel = cockpit.dbus(BUS_NAME, DBUS_OPTIONS);
    watcher = channel;
    channel.addEventListener("owner", (event, owner) => {
        if (channel === watcher)
            ownerChanged(owner);
    });
    channel.addEventListener("close", () => {
        if (channel !== watcher)
            return;
        watcher = null;
        nameOwner = undefined;
        window.setTimeout(watchOwner, watchBackoff.next());
    });
}

function start() {
    cockpit.translate();
    loadUserNames();
    watchOwner();
    connect(undefined);
    window.setInterval(tick, 1000);
    document.body.dataset.ready = "1";
}

start();
