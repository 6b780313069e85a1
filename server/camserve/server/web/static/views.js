// What the page shows of an answer: one entry per kind of output. Each view says whether an
// answer has something for it (`shows`) and draws it into its own section (`render`), returning
// an optional `update(display)` the opacity slider and the raw toggle call. A new output of the
// API (feature maps, kernels, saliency maps) is one more entry in VIEWS.

import { colouredCanvas, decodeTensor, download, drawOverlay, npyBlob } from "./heatmaps.js";

export const SCORES = {
  confidence_change: { title: "confidence change", higherIsBetter: true },
  deletion_auc: { title: "deletion AUC", higherIsBetter: false, curve: "deletion_curve" },
  insertion_auc: { title: "insertion AUC", higherIsBetter: true, curve: "insertion_curve" },
};

export function methodName(method) {
  return (method || "METHOD_GRADCAM").replace(/^METHOD_/, "").toLowerCase();
}

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function formatted(value) {
  return value === undefined || value === null ? "—" : Number(value).toFixed(4);
}

function heatmapsOf(response) {
  return (response.results || []).flatMap((result) => result.heatmaps || []);
}

const predictions = {
  id: "predictions",
  title: "Predictions",
  shows: (response) => (response.results || []).some((r) => (r.predictions || []).length),
  render(section, { response }) {
    const rows = response.results[0].predictions.map((p) => {
      const bar = element("span", { class: "bar" });
      bar.style.width = `${Math.round(120 * p.probability)}px`;
      return element("tr", {}, [
        element("td", { text: p.label || `class ${p.index}` }),
        element("td", { text: String(p.index) }),
        element("td", {}, [`${(100 * p.probability).toFixed(1)}%`, bar]),
      ]);
    });
    const head = element("tr", {}, ["label", "index", "probability"].map((t) => element("th", { text: t })));
    section.append(element("table", { id: "predictions-table" }, [head, ...rows]));
  },
};

const overlays = {
  id: "overlays",
  title: "Heatmaps",
  shows: (response) => heatmapsOf(response).length > 0,
  render(section, { response, photo, display, fileStem }) {
    const grid = element("div", { class: "overlays" });
    const drawn = heatmapsOf(response).map((heatmap) => {
      const map = decodeTensor(heatmap.data);
      const coloured = colouredCanvas(map);
      const canvas = element("canvas", { class: "overlay", "data-method": methodName(heatmap.method) });
      const name = `${fileStem}-${methodName(heatmap.method)}-${heatmap.class_index}`;
      const png = element("button", { type: "button", text: "overlay PNG" });
      png.addEventListener("click", () => canvas.toBlob((blob) => download(blob, `${name}.png`)));
      const npy = element("button", { type: "button", text: "raw map .npy" });
      npy.addEventListener("click", () => download(npyBlob(map), `${name}.npy`));
      const caption = `${methodName(heatmap.method)} · ${heatmap.class_label || heatmap.class_index} · ${heatmap.layer}`;
      grid.append(
        element("figure", {}, [
          canvas,
          element("figcaption", { text: caption }),
          element("div", { class: "downloads" }, [png, npy]),
        ]),
      );
      return { canvas, coloured };
    });
    section.append(grid);
    const update = (state) => {
      for (const { canvas, coloured } of drawn) drawOverlay(canvas, photo, coloured, state.opacity, state.raw);
    };
    update(display);
    return update;
  },
};

const scores = {
  id: "scores",
  title: "Faithfulness scores",
  shows: (response) => heatmapsOf(response).some((h) => Object.keys(SCORES).some((s) => s in h)),
  render(section, { response }) {
    const names = Object.keys(SCORES).filter((s) => heatmapsOf(response).some((h) => s in h));
    const head = element("tr", {}, [
      element("th", { text: "method" }),
      element("th", { text: "class" }),
      ...names.map((n) => element("th", { text: `${SCORES[n].title} (${SCORES[n].higherIsBetter ? "higher" : "lower"} is better)` })),
    ]);
    const rows = heatmapsOf(response).map((h) =>
      element("tr", {}, [
        element("td", { text: methodName(h.method) }),
        element("td", { text: h.class_label || String(h.class_index) }),
        ...names.map((n) => element("td", { class: "score", text: formatted(h[n]) })),
      ]),
    );
    section.append(element("table", { id: "scores-table" }, [head, ...rows]));
  },
};

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f", "#854d0e", "#475569"];

function plot(title, series) {
  const [width, height, pad] = [320, 200, 30];
  const canvas = element("canvas", { class: "curve", width: String(width), height: String(height) });
  const context = canvas.getContext("2d");
  context.font = "11px sans-serif";
  context.strokeStyle = "#9aa5b1";
  context.strokeRect(pad, 8, width - pad - 8, height - pad - 8);
  context.fillStyle = "#1d232b";
  context.fillText(title, pad + 4, 20);
  context.fillText("0", pad - 10, height - pad);
  context.fillText("1", pad - 10, 14);
  context.fillText("fraction of pixels", width / 2 - 40, height - 8);
  series.forEach(({ label, values }, index) => {
    const colour = COLOURS[index % COLOURS.length];
    context.strokeStyle = colour;
    context.beginPath();
    values.forEach((y, k) => {
      const px = pad + ((width - pad - 8) * k) / Math.max(1, values.length - 1);
      const py = height - pad - (height - pad - 8) * y;
      if (k === 0) context.moveTo(px, py);
      else context.lineTo(px, py);
    });
    context.stroke();
    context.fillStyle = colour;
    context.fillText(label, width - 110, 34 + 13 * index);
  });
  return canvas;
}

const curves = {
  id: "curves",
  title: "Deletion and insertion curves",
  shows: (response) => heatmapsOf(response).some((h) => (h.deletion_curve || h.insertion_curve || []).length),
  render(section, { response }) {
    const box = element("div", { class: "curves" });
    for (const [name, score] of Object.entries(SCORES)) {
      if (!score.curve) continue;
      const series = heatmapsOf(response)
        .filter((h) => (h[score.curve] || []).length)
        .map((h) => ({ label: `${methodName(h.method)} ${h.class_index}`, values: h[score.curve] }));
      if (series.length) box.append(plot(`${score.title.replace(" AUC", "")}: class probability`, series));
    }
    section.append(box);
  },
};

export const VIEWS = [predictions, overlays, scores, curves];

// Every method ranked by each score (means over the images), as `camserve compare` reports them.
export function renderComparison(container, attempts, scoreNames) {
  const section = element("section", { class: "view", id: "view-compare" }, [element("h2", { text: "Compare methods" })]);
  const means = attempts.map(({ method, response }) => {
    const values = {};
    for (const name of scoreNames) {
      const found = response ? heatmapsOf(response).map((h) => h[name]).filter((v) => v !== undefined) : [];
      values[name] = found.length ? found.reduce((a, b) => a + b, 0) / found.length : undefined;
    }
    return { method, values };
  });
  const ranks = {};
  for (const name of scoreNames) {
    const scored = means.filter((m) => m.values[name] !== undefined);
    scored.sort((a, b) => (SCORES[name].higherIsBetter ? b.values[name] - a.values[name] : a.values[name] - b.values[name]));
    scored.forEach((m, index) => { ranks[`${m.method}/${name}`] = index + 1; });
  }
  const meanRank = (m) => {
    const found = scoreNames.map((n) => ranks[`${m.method}/${n}`]).filter((r) => r !== undefined);
    return found.length ? found.reduce((a, b) => a + b, 0) / found.length : Infinity;
  };
  means.sort((a, b) => meanRank(a) - meanRank(b));
  const head = element("tr", {}, [
    element("th", { text: "rank" }),
    element("th", { text: "method" }),
    ...scoreNames.map((n) => element("th", { text: SCORES[n].title })),
  ]);
  const rows = means.map((m, index) => {
    const attempt = attempts.find((a) => a.method === m.method);
    if (attempt.error) {
      return element("tr", {}, [element("td", { text: "—" }), element("td", { text: m.method }), element("td", { colspan: String(scoreNames.length), class: "refused", text: `refused: ${attempt.error}` })]);
    }
    return element("tr", {}, [
      element("td", { text: String(index + 1) }),
      element("td", { text: m.method }),
      ...scoreNames.map((n) => element("td", { class: ranks[`${m.method}/${n}`] === 1 ? "best" : "", text: formatted(m.values[n]) })),
    ]);
  });
  section.append(element("table", { id: "compare-table" }, [head, ...rows]));
  section.append(element("p", { text: "Ranked by the mean of each method's rank over the scores; the best value of each score is in bold." }));
  container.append(section);
}

export function renderViews(container, context) {
  const updates = [];
  for (const view of VIEWS) {
    if (!view.shows(context.response)) continue;
    const section = element("section", { class: "view", id: `view-${view.id}` }, [element("h2", { text: view.title })]);
    const update = view.render(section, context);
    if (update) updates.push(update);
    container.append(section);
  }
  return (display) => updates.forEach((update) => update(display));
}
