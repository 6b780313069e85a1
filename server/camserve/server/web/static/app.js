// The page: picks an image and options, asks the HTTP API, and hands the answer to the views.
// The access token (when the server wants one) lives in this tab's session storage and travels
// only in the Authorization header, never in a URL.

import { methodName, renderComparison, renderViews, SCORES } from "./views.js";
import { download, tensorNpyBlob } from "./heatmaps.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "camserve-token";
const DEFAULT_METHODS = ["gradcam", "layercam"];
let models = [];
let chosenFile = null;
let photo = null;
let refresh = () => {};

class ApiError extends Error {}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new ApiError(`could not reach the server (${error.message}); is it still running?`);
  }
  const text = await response.text();
  let body;
  try {
    body = text ? JSON.parse(text) : {};
  } catch {
    throw new ApiError(`the server answered ${response.status} ${response.statusText} without JSON`);
  }
  if (response.status === 401) $("token-form").hidden = false;
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    const hint = retry ? ` (retry after ${retry} s)` : "";
    throw new ApiError(`${response.status} ${body.status || response.statusText}: ${body.message || text}${hint}`);
  }
  return body;
}

function option(value, text) {
  const node = document.createElement("option");
  node.value = value;
  node.textContent = text;
  return node;
}

async function loadModels() {
  models = (await api("/v1/models")).models || [];
  $("model").replaceChildren(...models.map((m) => option(m.name, `${m.name}${m.ready ? "" : " (loading)"}`)));
  if (!models.length) throw new ApiError("this server hosts no models");
  await loadModel(models[0].name);
}

async function loadModel(name) {
  const info = await api(`/v1/models/${encodeURIComponent(name)}`);
  $("layer").replaceChildren(
    ...(info.layers || []).map((layer) =>
      option(layer.name, `${layer.name}${layer.name === info.default_layer ? " (default)" : ""}`),
    ),
  );
  $("layer").value = info.default_layer || "";
  $("labels").replaceChildren(...(info.labels || []).map((label) => option(label, label)));
  const convs = info.conv_layers || [];
  $("conv-layer").replaceChildren(
    ...convs.map((conv) => option(conv.name, `${conv.name} (${conv.weight_shape.join("x")})`)),
  );
  $("kernels-choice").hidden = !convs.length;
  const methods = (info.methods || []).map(methodName);
  $("methods").replaceChildren(
    ...methods.map((method) => {
      const box = document.createElement("input");
      box.type = "checkbox";
      box.name = "method";
      box.value = method;
      box.checked = DEFAULT_METHODS.includes(method);
      const label = document.createElement("label");
      label.append(box, ` ${method}`);
      return label;
    }),
  );
}

function chosen(name) {
  return [...document.querySelectorAll(`input[name=${name}]:checked`)].map((box) => box.value);
}

// The multipart form of one request: the image and every option as its ExplainRequest field.
function requestForm(methods) {
  if (!chosenFile) throw new ApiError("choose or drop an image first");
  const form = new FormData();
  form.append("image", chosenFile, chosenFile.name);
  const layer = $("layer").value;
  if (layer) form.append("layer", layer);
  for (const method of methods) form.append("methods", method);
  const byLabel = document.querySelector("input[name=target]:checked").value === "label";
  if (byLabel) {
    if (!$("label").value) throw new ApiError("type a class label to explain, or choose top classes");
    form.append("target.class_labels", $("label").value);
  } else {
    form.append("target.top_k", $("top-k").value);
  }
  const scores = chosen("score");
  for (const score of scores) form.append("output.scores", score);
  if (scores.some((s) => SCORES[s].curve)) {
    form.append("output.score_steps", $("score-steps").value);
    form.append("output.score_curves", String($("curves").checked));
  }
  form.append("output.resolution", $("resolution").value);
  form.append("top_predictions", $("top-predictions").value);
  form.append("eigen_smooth", String($("eigen-smooth").checked));
  form.append("aug_smooth", String($("aug-smooth").checked));
  return form;
}

function explainPath() {
  return `/v1/models/${encodeURIComponent($("model").value)}:explain`;
}

function display() {
  return { opacity: Number($("opacity").value), raw: $("raw").checked };
}

async function busy(work) {
  showError("");
  for (const id of ["explain", "compare"]) $(id).disabled = true;
  $("busy").hidden = false;
  try {
    await work();
  } catch (error) {
    showError(error instanceof ApiError ? error.message : `the page failed: ${error.message}`);
  } finally {
    for (const id of ["explain", "compare"]) $(id).disabled = false;
    $("busy").hidden = true;
  }
}

async function explain() {
  const methods = chosen("method");
  const response = await api(explainPath(), { method: "POST", body: requestForm(methods) });
  const views = $("views");
  views.replaceChildren();
  const fileStem = chosenFile.name.replace(/\.[^.]*$/, "");
  await photo.decode(); // the overlays are drawn over it at its own size
  refresh = renderViews(views, { response, photo, display: display(), fileStem });
  $("results").hidden = false;
}

// Each method is its own request, so a method the server refuses costs only its own row.
async function compare() {
  const methods = chosen("method");
  if (!methods.length) throw new ApiError("tick the methods to compare");
  const scoreNames = chosen("score");
  if (!scoreNames.length) throw new ApiError("tick at least one score to rank the methods by");
  const attempts = [];
  for (const method of methods) {
    try {
      attempts.push({ method, response: await api(explainPath(), { method: "POST", body: requestForm([method]) }) });
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      attempts.push({ method, error: error.message });
    }
  }
  $("views").querySelector("#view-compare")?.remove();
  renderComparison($("views"), attempts, scoreNames);
  $("results").hidden = false;
}

// A conv layer's kernels: one page of the grid, and its weights for download.
async function showKernels() {
  const model = encodeURIComponent($("model").value);
  const page = Math.max(0, Number($("kernel-page").value) - 1);
  const query = new URLSearchParams({ layer: $("conv-layer").value, page: String(page) });
  const answer = await api(`/v1/models/${model}/kernels?${query}`);
  $("kernels-grid").src = `data:image/png;base64,${answer.grid_png}`;
  const kind = answer.colour ? "colour filters" : "one grayscale tile per filter and input channel";
  $("kernels-caption").textContent =
    `${answer.layer}: page ${(answer.page || 0) + 1} of ${answer.pages}, filters ` +
    `${answer.first_filter || 0} to ${answer.end_filter - 1}, ${kind}`;
  const npy = $("kernels-npy");
  npy.onclick = () => download(tensorNpyBlob(answer.weights), `${answer.layer}-kernels.npy`);
  $("kernels").hidden = false;
}

function choose(file) {
  if (!file) return;
  chosenFile = file;
  const image = $("preview");
  image.onerror = () => { image.hidden = true; };
  image.onload = () => { image.hidden = false; };
  if (image.src) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(file);
  photo = image;
}

function wire() {
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  $("model").addEventListener("change", () => busy(() => loadModel($("model").value)));
  $("request").addEventListener("submit", (event) => { event.preventDefault(); busy(explain); });
  $("compare").addEventListener("click", () => busy(compare));
  $("show-kernels").addEventListener("click", () => busy(showKernels));
  $("opacity").addEventListener("input", () => refresh(display()));
  $("raw").addEventListener("change", () => refresh(display()));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    $("token-form").hidden = true;
    busy(loadModels);
  });
}

wire();
busy(loadModels);
