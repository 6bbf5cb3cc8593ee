/* bbdecoder report charts: draws the chart specs of <script id="bbd-payload"> with uPlot.
 * Each chart: hover tooltip (layer, parameter, step, value of the nearest series), a legend whose
 * entries toggle series, drag-to-zoom (double-click resets), a log/linear toggle and a filter by
 * layer or parameter name. In the live dashboard, window.bbd.update(payload) redraws with new data.
 * No network access except the dashboard's own polling URL (same origin). */
(function () {
  "use strict";
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39",
    "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1"];
  var DASHES = [null, [6, 3], [2, 2], [8, 3, 2, 3]];

  function fmt(v) {
    if (v === null || v === undefined || !isFinite(v)) return "NaN";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
    return String(Number(v.toPrecision(4)));
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function Chart(root, spec) {
    this.root = root;
    this.spec = spec;
    this.log = !!spec.log;
    this.shown = spec.series.map(function () { return true; });
    this.filter = "";
    root.innerHTML = "";
    var bar = el("div", "bbd-toolbar");
    var logLabel = el("label", "bbd-log");
    this.logBox = el("input");
    this.logBox.type = "checkbox";
    this.logBox.checked = this.log;
    logLabel.appendChild(this.logBox);
    logLabel.appendChild(document.createTextNode(" log scale"));
    bar.appendChild(logLabel);
    this.filterBox = el("input", "bbd-filter");
    this.filterBox.type = "search";
    this.filterBox.placeholder = "filter by layer or parameter name";
    bar.appendChild(this.filterBox);
    this.allButton = el("button", "bbd-all", "all");
    this.noneButton = el("button", "bbd-none", "none");
    bar.appendChild(this.allButton);
    bar.appendChild(this.noneButton);
    this.count = el("span", "bbd-count");
    bar.appendChild(this.count);
    root.appendChild(el("div", "bbd-title", spec.title));
    root.appendChild(bar);
    this.plot = el("div", "bbd-plot");
    root.appendChild(this.plot);
    this.tooltip = el("div", "bbd-tooltip");
    this.tooltip.style.display = "none";
    this.legend = el("div", "bbd-legend");
    root.appendChild(this.legend);
    if (spec.note) root.appendChild(el("p", "note", spec.note));
    var self = this;
    this.logBox.addEventListener("change", function () { self.log = self.logBox.checked; self.build(); });
    this.filterBox.addEventListener("input", function () { self.applyFilter(self.filterBox.value); });
    this.allButton.addEventListener("click", function () { self.setAll(true); });
    this.noneButton.addEventListener("click", function () { self.setAll(false); });
    this.build();
  }

  Chart.prototype.colour = function (i) {
    return this.spec.kind === "bars" ? ["#7fc8d8", "#2b4c9a", "#e377c2", "#bcbd22"][i % 4] : PALETTE[i % PALETTE.length];
  };

  Chart.prototype.data = function () {
    var log = this.log;
    var ys = this.spec.series.map(function (s) {
      return log ? s.values.map(function (v) { return v !== null && v > 0 ? v : null; }) : s.values;
    });
    return [this.spec.x].concat(ys);
  };

  Chart.prototype.build = function () {
    var spec = this.spec, self = this;
    if (this.u) { this.u.destroy(); this.u = null; }
    var bars = spec.kind === "bars";
    var width = Math.max(320, (this.root.clientWidth || 900) - 4);
    var series = [{ label: spec.xlabel }];
    spec.series.forEach(function (s, i) {
      var entry = {
        label: s.label, stroke: self.colour(i), width: 1.25, show: self.shown[i], spanGaps: false,
        points: { show: spec.x.length <= 60 && !bars, size: 4 },
      };
      if (!bars && i >= PALETTE.length) entry.dash = DASHES[Math.floor(i / PALETTE.length) % DASHES.length];
      if (bars) {
        entry.fill = self.colour(i);
        entry.paths = uPlot.paths.bars({ size: [i === 0 ? 0.8 : 0.45, 60], align: 0 });
        entry.points = { show: false };
      }
      series.push(entry);
    });
    var INTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
    var xAxis = { label: spec.xlabel, incrs: INTS };
    var scales = { x: { time: false }, y: { distr: this.log ? 3 : 1 } };
    if (spec.yrange && !this.log) scales.y.range = function () { return spec.yrange; };
    if (bars) {
      var n = spec.categories.length;
      scales.x.range = function () { return [-0.5, n - 0.5]; };
      xAxis.space = 14;
      xAxis.rotate = -60;
      xAxis.size = 120;
      xAxis.values = function (u, splits) {
        return splits.map(function (v) {
          var c = spec.categories[v];
          return Number.isInteger(v) && c ? (c.length > 28 ? "…" + c.slice(-27) : c) : "";
        });
      };
    }
    var opts = {
      width: width, height: bars ? 360 : 300, series: series, scales: scales,
      legend: { show: false },
      cursor: { drag: { x: true, y: false }, points: { show: !bars }, focus: { prox: 24 } },
      axes: [xAxis, { label: spec.ylabel, size: 70 }],
      hooks: { setCursor: [function (u) { self.hover(u); }] },
    };
    this.u = new uPlot(opts, this.data(), this.plot);
    this.u.over.appendChild(this.tooltip);
    this.u.over.addEventListener("mouseleave", function () { self.tooltip.style.display = "none"; });
    this.drawLegend();
  };

  Chart.prototype.nearest = function (u, idx, top) {
    var best = -1, dist = Infinity;
    for (var i = 1; i < u.series.length; i++) {
      if (!u.series[i].show) continue;
      var v = u.data[i][idx];
      if (v === null || v === undefined) continue;
      var d = Math.abs(u.valToPos(v, "y") - top);
      if (d < dist) { dist = d; best = i; }
    }
    return best;
  };

  Chart.prototype.hover = function (u) {
    var idx = u.cursor.idx, tip = this.tooltip, spec = this.spec;
    if (idx === null || idx === undefined || u.cursor.left < 0) { tip.style.display = "none"; return; }
    var i = this.nearest(u, idx, u.cursor.top);
    if (i < 0) { tip.style.display = "none"; return; }
    var s = spec.series[i - 1], lines = [];
    if (spec.kind === "bars") {
      var c = spec.category_info[idx];
      lines.push(["layer", c.layer_id >= 0 ? "[" + c.layer_id + "] " + c.layer : "model"]);
      lines.push(["parameter", c.param]);
      lines.push([s.label, fmt(u.data[i][idx])]);
    } else {
      lines.push(["layer", s.layer_id >= 0 ? "[" + s.layer_id + "] " + s.layer : "model"]);
      if (s.param) lines.push(["parameter", s.param]);
      lines.push([spec.xlabel, String(u.data[0][idx])]);
      lines.push([s.stat, fmt(u.data[i][idx])]);
    }
    tip.innerHTML = "";
    lines.forEach(function (pair) {
      var row = el("div");
      row.appendChild(el("b", null, pair[0] + ": "));
      row.appendChild(document.createTextNode(pair[1]));
      tip.appendChild(row);
    });
    tip.dataset.series = String(i - 1);
    tip.dataset.layer = s.layer || "";
    tip.style.display = "block";
    var left = u.cursor.left + 12, width = u.over.clientWidth;
    tip.style.left = (left + 260 > width ? Math.max(0, u.cursor.left - 272) : left) + "px";
    tip.style.top = Math.max(0, u.cursor.top - 10) + "px";
  };

  Chart.prototype.drawLegend = function () {
    var self = this, legend = this.legend;
    legend.innerHTML = "";
    this.items = this.spec.series.map(function (s, i) {
      var item = el("span", "bbd-item");
      item.dataset.series = String(i);
      item.title = s.label + " (click to show or hide)";
      var swatch = el("i");
      swatch.style.background = self.colour(i);
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(s.label));
      item.addEventListener("click", function () { self.toggle(i); });
      legend.appendChild(item);
      return item;
    });
    this.refreshLegend();
  };

  Chart.prototype.refreshLegend = function () {
    var self = this, visible = 0;
    this.items.forEach(function (item, i) {
      item.classList.toggle("off", !self.shown[i]);
      item.style.display = self.matches(i) ? "" : "none";
      if (self.shown[i]) visible++;
    });
    this.count.textContent = visible + " of " + this.spec.series.length + " series shown";
  };

  Chart.prototype.matches = function (i) {
    return !this.filter || this.spec.series[i].label.toLowerCase().indexOf(this.filter) >= 0;
  };

  Chart.prototype.setShown = function (i, show) {
    this.shown[i] = show;
    if (this.u) this.u.setSeries(i + 1, { show: show });
  };

  Chart.prototype.toggle = function (i) {
    this.setShown(i, !this.shown[i]);
    this.refreshLegend();
  };

  Chart.prototype.setAll = function (show) {
    for (var i = 0; i < this.shown.length; i++) if (this.matches(i)) this.setShown(i, show);
    this.refreshLegend();
  };

  Chart.prototype.applyFilter = function (text) {
    this.filter = (text || "").trim().toLowerCase();
    for (var i = 0; i < this.shown.length; i++) this.setShown(i, this.matches(i));
    this.refreshLegend();
  };

  Chart.prototype.update = function (spec) {
    var prev = this.spec, same = spec.kind === prev.kind && spec.series.length === prev.series.length &&
      spec.series.every(function (s, i) { return s.label === prev.series[i].label; });
    if (same && this.u) { this.spec = spec; this.u.setData(this.data()); return; }
    var shownByLabel = {};
    prev.series.forEach(function (s, i) { shownByLabel[s.label] = this.shown[i]; }, this);
    this.spec = spec;
    this.shown = spec.series.map(function (s) { return s.label in shownByLabel ? shownByLabel[s.label] : true; });
    this.build();
  };

  var charts = {};

  function renderAlerts(alerts) {
    var box = document.getElementById("bbd-alerts");
    if (!box && alerts && alerts.length && window.bbdLive) {
      box = el("div");
      box.id = "bbd-alerts";
      liveBox().appendChild(box);
    }
    if (!box || !alerts) return;
    box.innerHTML = "";
    if (!alerts.length) { box.appendChild(el("p", "note", "No alert was raised.")); return; }
    var table = el("table"), head = el("tr");
    ["step", "alert", "layer", "parameter", "message"].forEach(function (h) { head.appendChild(el("th", "text", h)); });
    table.appendChild(head);
    alerts.forEach(function (a) {
      var row = el("tr", "bbd-alert");
      row.dataset.kind = a.kind;
      [a.step === null ? "" : String(a.step), a.kind, a.layer || "", a.param || "", a.message].forEach(function (v) {
        row.appendChild(el("td", "text", v));
      });
      table.appendChild(row);
    });
    box.appendChild(table);
  }

  function liveBox() {
    // Charts whose section had no data when the page was served go into one section at the end.
    var box = document.getElementById("bbd-live-new");
    if (!box) {
      var section = el("section");
      section.id = "live-new";
      section.appendChild(el("h2", null, "Recorded since the page was opened"));
      box = el("div");
      box.id = "bbd-live-new";
      section.appendChild(box);
      (document.querySelector("main") || document.body).appendChild(section);
    }
    return box;
  }

  function update(payload) {
    (payload.charts || []).forEach(function (spec) {
      var root = document.querySelector('[data-chart="' + spec.id + '"]');
      if (!root && payload.live) {
        root = el("div", "bbd-chart");
        root.dataset.chart = spec.id;
        liveBox().appendChild(root);
      }
      if (!root) return;
      if (charts[spec.id]) charts[spec.id].update(spec);
      else charts[spec.id] = new Chart(root, spec);
    });
    var latest = document.getElementById("latest-step");
    if (latest) latest.textContent = payload.latest_step === null ? "none" : String(payload.latest_step);
    renderAlerts(payload.alerts);
  }

  function poll(live) {
    var status = document.getElementById("bbd-live-status");
    function once() {
      fetch(live.url, { cache: "no-store", credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
        .then(function (p) { update(p); if (status) status.textContent = "live · updated " + new Date().toLocaleTimeString(); })
        .catch(function (e) { if (status) status.textContent = "live · " + e.message; })
        .then(function () { setTimeout(once, live.interval_ms || 1000); });
    }
    setTimeout(once, live.interval_ms || 1000);
  }

  function start() {
    var node = document.getElementById("bbd-payload");
    if (!node) return;
    var payload = JSON.parse(node.textContent);
    window.bbdLive = !!payload.live;
    update(payload);
    window.bbd.renderedAt = performance.now();  // ms since navigation start: the benchmark's "first render"
    window.addEventListener("resize", function () {
      Object.keys(charts).forEach(function (k) {
        var c = charts[k];
        if (c.u) c.u.setSize({ width: Math.max(320, c.root.clientWidth - 4), height: c.u.height });
      });
    });
    if (payload.live) poll(payload.live);
  }

  window.bbd = { charts: charts, update: update };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
