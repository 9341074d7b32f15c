// The pipeline panel: polls v1/pipeline every second and draws one row per stage (its pool, queue,
// utilization, pressure and latency), marks the bottleneck, charts each stage's pressure over the last
// two minutes, and lists the allocator's last decisions. The JSON is allocator/profiler.py's
// Profile.to_json plus app/routes/ops.py's budgets and allocator.

const POLL_MS = 1000;
const HISTORY = 120; // polls the chart keeps: two minutes
const DECISIONS_SHOWN = 6;
const STAGE_COLORS = ['#4c6ef5', '#f08c00', '#12b886', '#ae3ec9', '#e64980', '#15aabf'];

const $ = (id) => document.getElementById(id);
const history = new Map(); // stage name -> its last HISTORY pressures, oldest first
let shownModel = null;

function span(text, className) {
  const element = document.createElement('span');
  element.className = className;
  element.textContent = text;
  return element;
}

function cell(className, ...content) {
  const td = document.createElement('td');
  if (className) td.className = className;
  td.append(...content);
  return td;
}

function formatSeconds(seconds) {
  if (!seconds) return '–';
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

function pressureGauge(pressure, isBottleneck) {
  const fill = document.createElement('div');
  fill.style.width = `${Math.round(Math.min(1, pressure) * 100)}%`;
  fill.dataset.level = isBottleneck ? 'high' : pressure >= 0.3 ? 'medium' : 'low';
  const bar = document.createElement('div');
  bar.className = 'bar';
  bar.append(fill);
  const gauge = document.createElement('div');
  gauge.className = 'gauge';
  gauge.append(bar, span(pressure.toFixed(2), 'num'));
  return gauge;
}

function stageRow(stage, index, bottleneck) {
  const isBottleneck = stage.name === bottleneck;
  const swatch = span('', 'swatch');
  swatch.style.background = STAGE_COLORS[index % STAGE_COLORS.length];
  const row = document.createElement('tr');
  row.dataset.stage = stage.name;
  if (isBottleneck) row.className = 'bottleneck';
  row.append(
    cell('name', swatch, stage.name, ...(isBottleneck ? [span('bottleneck', 'tag')] : [])),
    cell('', span(stage.device, `device ${stage.device}`)),
    cell('workers', String(stage.workers), span(` (${stage.min_workers}–${stage.max_workers})`, 'range')),
    cell('', String(stage.busy_workers)),
    cell('', `${stage.queue_depth} / ${stage.queue_capacity}`),
    cell('', `${Math.round(stage.utilization * 100)} %`),
    cell('', pressureGauge(stage.pressure, isBottleneck)),
    cell('', formatSeconds(stage.latency_p95_s)),
  );
  return row;
}

function decisionItem(decision) {
  const item = document.createElement('li');
  const time = new Date(decision.at * 1000).toLocaleTimeString([], { hour12: false });
  const change = decision.action === 'hold' ? 'held' : `${decision.workers_before} → ${decision.workers_after}`;
  item.append(
    span(time, 'when'),
    span(`${decision.stage} ${decision.action}`, `action ${decision.action}`),
    span(change, 'change'),
    span(decision.reason, 'reason'),
  );
  return item;
}

function drawChart(canvas, stages) {
  const width = canvas.clientWidth, height = canvas.clientHeight, ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext('2d');
  context.scale(ratio, ratio);
  const left = 28, top = 6, plotWidth = width - left, plotHeight = height - top - 4;
  const y = (pressure) => top + plotHeight * (1 - Math.min(1, pressure));
  context.font = '11px system-ui, sans-serif';
  context.textBaseline = 'middle';
  for (const level of [0, 0.5, 1]) {
    context.fillStyle = '#98a0b0';
    context.fillText(level.toFixed(1), 0, y(level));
    context.fillStyle = '#eceef2';
    context.fillRect(left, Math.round(y(level)), plotWidth, 1);
  }
  const step = plotWidth / (HISTORY - 1);
  stages.forEach((stage, index) => {
    const values = history.get(stage.name);
    context.strokeStyle = STAGE_COLORS[index % STAGE_COLORS.length];
    context.lineWidth = 2;
    context.lineJoin = 'round';
    context.beginPath();
    values.forEach((pressure, i) => {
      const x = left + plotWidth - (values.length - 1 - i) * step; // the newest poll at the right edge
      if (i === 0) context.moveTo(x, y(pressure));
      else context.lineTo(x, y(pressure));
    });
    context.stroke();
  });
}

function render(pipeline) {
  if (pipeline.model !== shownModel) history.clear(); // another model's pipeline: a new chart
  shownModel = pipeline.model;
  for (const stage of pipeline.stages) {
    const values = history.get(stage.name) ?? [];
    values.push(stage.pressure);
    history.set(stage.name, values.slice(-HISTORY));
  }
  $('pipeline-meta').textContent = `model ${pipeline.model} · last ${Math.round(pipeline.window_s)} s`;
  $('stages').tBodies[0].replaceChildren(...pipeline.stages.map((stage, i) => stageRow(stage, i, pipeline.bottleneck)));
  drawChart($('pressure-chart'), pipeline.stages);
  const { enabled, decisions } = pipeline.allocator;
  const devices = new Set(pipeline.stages.map((stage) => stage.device)); // no GPU budget on a CPU-only server
  const budgets = Object.entries(pipeline.budgets).filter(([device]) => devices.has(device))
    .map(([device, budget]) => `${budget.used} of ${budget.total} (${device})`).join(', ');
  $('pipeline-note').textContent = `${pipeline.bottleneck ? `Bottleneck: ${pipeline.bottleneck}. ` : 'No bottleneck. '}`
    + `Allocator ${enabled ? 'on' : 'off'}; extra workers in use: ${budgets}.`;
  const list = $('decisions');
  list.replaceChildren(...decisions.slice(0, DECISIONS_SHOWN).map(decisionItem));
  if (!decisions.length) {
    const none = document.createElement('li');
    none.className = 'placeholder';
    none.textContent = 'None yet: every pool has the size it started with.';
    list.append(none);
  }
}

/** Start polling; `headers()` gives the request's auth headers, `model()` the model to show (null: the default). */
export function startPipelinePanel({ headers, model }) {
  async function poll() {
    try {
      const url = new URL('v1/pipeline', location.href);
      const name = model();
      if (name) url.searchParams.set('model', name);
      const response = await fetch(url, { headers: headers(), cache: 'no-store' });
      const body = await response.json().catch(() => null);
      if (response.ok) render(body);
      else if (response.status === 401) $('pipeline-note').textContent = 'Enter the server\'s API key above to see its pipeline.';
      else $('pipeline-note').textContent = body?.error?.message ?? `The server answered HTTP ${response.status}.`;
    } catch {
      $('pipeline-note').textContent = 'The server cannot be reached.';
    }
    setTimeout(poll, POLL_MS);
  }
  poll();
}
