"""Report strings in English and Chinese, plus the reference project's published figures."""

from __future__ import annotations

# each key's text in every language, side by side, so that no language can lack one
_TEXT = {
    "title": ("Compression study: candidate-segmentation U-Net",
              "压缩实验：候选结节分割 U-Net"),
    "intro": (("Every figure below is measured on the deployed artifact (ONNX Runtime, CPU), not on the PyTorch "
               "model. Ratios are baseline / variant; recall change is in percentage points."),
              "下列数据均在部署产物上测得（ONNX Runtime，CPU），而非 PyTorch 模型。压缩比 = 基线 / 变体；召回率变化以百分点计。"),
    "main": ("Variants",
             "模型版本对比"),
    "header": (["Variant", "Params", "Weight Memory (KiB)", "Reduction Ratio", "Size (KiB)", "Reduction Ratio",
                "Latency (us)", "Speed-up", "Recall (%)", "Recall Change", "Precision (%)", "Dice"],
               ["模型版本", "Weight Memory (KiB)", "Reduction Ratio", "Size (KiB)", "Latency (us)", "Reduction Ratio",
                "Recall (%)", "Recall Drop"]),
    "errors": ("Failed variants",
               "失败的版本"),
    "matched": ("Recall at the baseline's precision",
                "与基线精确率相同时的召回率"),
    "matched_note": (("A variant that marks more pixels than the baseline gains recall and loses precision. Here "
                      "each variant's probability threshold is raised until its pixel precision is at least the "
                      "baseline's (at 0.5), and its recall is read there: the comparison at equal precision. n/a: "
                      "no threshold reaches the baseline's precision."),
                     ("标记像素比基线更多的版本，召回率会升高而精确率下降。此处逐个提高各版本的概率阈值，直到其像素精确率不低于基线（阈值 0.5）的精确率"
                      "，再读取该阈值下的召回率，即在相同精确率下比较。n/a：没有阈值能达到基线的精确率。")),
    "matched_header": (["Variant", "Precision at 0.5 (%)", "Recall at 0.5 (%)", "Threshold",
                        "Recall at baseline precision (%)", "Change (pts)"],
                       ["模型版本", "精确率 @0.5 (%)", "召回率 @0.5 (%)", "阈值", "基线精确率下的召回率 (%)", "变化（百分点）"]),
    "settings": ("Settings",
                 "实验设置"),
    "settings_text": (("Pruning: L1-norm structured channel pruning (torch-pruning), ratio `{prune_ratio}`, "
                       "{finetune_epochs} fine-tuning epochs. Fine-tuning and QAT weigh a crop's sums in the pooled "
                       "Dice by `{dice_area_cap} / max(nodule pixels, {dice_area_cap})` (training: 64). PTQ: ONNX "
                       "Runtime static QDQ, per-channel int8 weights, uint8 activations, `{calib_method}` "
                       "calibration on {calib_slices} training slices (half with nodules). QAT: torchao PT2E "
                       "fake-quant, {qat_epochs} epochs, false-negative weight {fn_weight_qat}. The pruned model's "
                       "fine-tuning keeps the epoch with the highest nodule-level recall, then pixel recall up to "
                       "the baseline's, then Dice; QAT keeps the epoch with the highest recall (nodule-level, then "
                       "pixel; judged on {qat_val_slices} validation slices, the fake-quant graph being slow). A "
                       "recall above the baseline's with a lower precision and Dice means the variant marks more "
                       "than the baseline does, not that it segments better."),
                      ("剪枝：基于 L1 范数的结构化通道剪枝（torch-pruning），比例 `{prune_ratio}`，微调 {finetune"
                       "_epochs} 轮。微调与 QAT 的批量 Dice 中，每个裁剪块的求和按 `{dice_area_cap} / max(结节像"
                       "素数, {dice_area_cap})` 加权（训练时为 64）。PTQ：ONNX Runtime 静态 QDQ 量化，逐通道 i"
                       "nt8 权重，uint8 激活，`{calib_method}` 校准，{calib_slices} 张训练切片（一半含结节）。QA"
                       "T：torchao PT2E 伪量化训练 {qat_epochs} 轮，假阴性权重 {fn_weight_qat}。剪枝模型微调保留"
                       "的轮次：先看结节级召回率，再看不超过基线的像素级召回率，最后看 Dice；QAT 保留召回率最高的轮次（先按结节级，再按像素级；因伪"
                       "量化图较慢，在 {qat_val_slices} 张验证切片上评估）。若召回率高于基线而精确率与 Dice 更低，说明该版本标记的区"
                       "域比基线更多，而不是分割得更好。")),
    "why_ptq": (("What this PTQ does against the reference's 7.2-point recall loss: half of the calibration slices "
                 "hold nodules, so the bright, rare activations of nodules set the ranges; percentile calibration "
                 "ignores the few extreme values that would stretch the grid; weights are per-channel; the input "
                 "BatchNorm, the last conv's logits and the Sigmoid stay float, so the 0.5 threshold does not fall "
                 "on a coarse uint8 grid. The recall change column above is the measured effect."),
                ("针对参考项目 PTQ 召回率下降 7.2 个百分点，本实验的做法：校准切片一半含结节，结节产生的少见高亮激活决定量化范围；百分位校准忽略少"
                 "数极端值；权重逐通道量化；输入 BatchNorm、最后一层卷积的 logits 与 Sigmoid 保持浮点，0.5 阈值不落在粗糙的 "
                 "uint8 网格上。实际效果见上表的召回率变化。")),
    "memory_note": (("Weight memory: bytes of the stored weights in the deployed ONNX at their stored precision "
                     "(fp32 x4, int8 x1, int32 biases x4, BatchNorm parameters), including the per-channel scales "
                     "and zero points of int8 weights, excluding the per-tensor activation quantization scalars. "
                     "Params: trainable parameters of the model behind the file."),
                    ("Weight Memory：部署 ONNX 中权重按存储精度计的字节数（fp32 x4、int8 x1、int32 偏置 x4、Bat"
                     "chNorm 参数），包含 int8 权重的逐通道 scale 与 zero point，不含逐张量的激活量化参数。参数量：该文件对应"
                     "模型的可训练参数。")),
    "machine": ("Machine",
                "测试机器"),
    "dataset": ("Dataset",
                "数据集"),
    "plots": ("Plots",
              "图表"),
    "plot_bars": ("Weight memory, size and latency per variant",
                  "各版本的权重内存、文件大小与延迟"),
    "plot_pareto": ("Recall vs latency (Pareto front)",
                    "召回率与延迟（帕累托前沿）"),
    "plot_widths": ("Channel widths per layer before and after pruning",
                    "剪枝前后各层通道数"),
    "plot_hist": ("Weight histograms per layer",
                  "各层权重分布直方图"),
    "reference": ("Reference study (other project, for comparison)",
                  "参考研究（另一项目，仅供对比）"),
    "reference_note": (("Figures published by the reference project for its RK3588S NPU deployment on LUNA16; they "
                        "are not measurements of this study and ran on different hardware."),
                       "以下为参考项目在 LUNA16 上、部署于 RK3588S NPU 时公布的数据，并非本实验测量结果，硬件不同。"),
    "ref_header": (["Model", "Weight Memory (KiB)", "Reduction Ratio", "Latency (us)", "Speed-up", "Recall (%)",
                    "Recall Change"],
                   ["模型版本", "Weight Memory (KiB)", "Reduction Ratio", "Latency (us)", "Reduction Ratio",
                    "Recall (%)", "Recall Drop"]),
    "cpu": ("CPU runtimes",
            "CPU 运行时"),
    "cpu_note": (("The float variants in each CPU runtime, timed in one interleaved run at the study's thread count; "
                  "speed-ups are against the baseline in ONNX Runtime fp32. OpenVINO int8 is NNCF post-training "
                  "quantization on the same calibration slices as the ONNX Runtime PTQ; its weight memory is the "
                  "IR's .bin file. int8 pays off on CPUs with VNNI (AVX-512 VNNI or AVX-VNNI); without it, "
                  "OpenVINO fp32 is the fast path."),
                 ("各浮点版本在各 CPU 运行时上的表现，在同一次交替测量中以相同线程数计时；加速比以 ONNX Runtime fp32 "
                  "基线为准。OpenVINO int8 为 NNCF 训练后量化，校准切片与 ONNX Runtime PTQ 相同；其权重内存为 IR 的 "
                  ".bin 文件大小。int8 在支持 VNNI（AVX-512 VNNI 或 AVX-VNNI）的 CPU 上才有收益；否则 OpenVINO fp32 "
                  "是最快路径。")),
    "cpu_header": (["Model and runtime", "Weight Memory (KiB)", "Size (KiB)", "Latency (us)", "Speed-up",
                    "Recall (%)", "Recall Change"],
                   ["模型与运行时", "Weight Memory (KiB)", "Size (KiB)", "Latency (us)", "加速比",
                    "Recall (%)", "Recall Change"]),
    "npu": ("RK3588 NPU",
            "RK3588 NPU"),
    "npu_note": ("Weight-memory ratios are against the fp16 baseline row. Latency needs a connected board.",
                 "权重内存压缩比以 fp16 基线为准。延迟需连接开发板测量。"),
    "npu_header": (["Model", "Weight Memory (KiB)", "Reduction Ratio", "Internal Memory (KiB)", "Size (KiB)",
                    "Recall (%)", "CPU fallback layers", "Latency (us)"],
                   ["模型版本", "Weight Memory (KiB)", "Reduction Ratio", "Internal Memory (KiB)", "Size (KiB)",
                    "Recall (%)", "CPU 回退层数", "Latency (us)"]),
    "classifier": ("False-positive classifier (2D rewrite)",
                   "假阳性分类器（2D 改写）"),
    "cls_header": (["Model", "Params", "Weight Memory (KiB)", "Size (KiB)", "Latency (us)", "AUC", "F1 (p >= 0.5)",
                    "Max abs diff vs 3D"],
                   ["模型版本", "参数量", "Weight Memory (KiB)", "Size (KiB)", "Latency (us)", "AUC", "F1 (p >= 0.5)",
                    "与 3D 最大绝对误差"]),
    "detection": ("Detection (FROC)",
                  "检测（FROC）"),
    "det_cpm": ("CPM",
                "CPM"),
    "det_viewers": ("Each held-out scan in the viewer (one HTML file, opens in any browser):",
                    "各留出扫描的查看器（单个 HTML 文件，任意浏览器可打开）："),
    "det_header": (["FPs per scan", "Sensitivity"],
                   ["每例假阳性数", "灵敏度"]),
    "froc": ("Detection per variant (FROC)",
             "各版本的检测效果（FROC）"),
    "froc_why": (("Why CPM leads: pixel recall at threshold 0.5 counts pixels, and a variant that marks more pixels "
                  "gains recall while its precision falls, so that figure rewards over-marking. A user of the "
                  "detector sees nodules found and false marks per scan. Here each variant runs the whole "
                  "detector (its deployed file in its runtime, the same classifier behind every variant) on whole "
                  "scans, scored with the LUNA16 FROC: CPM is the mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and "
                  "8 false positives per scan. The independent draw is synthetic data that nothing was trained "
                  "or chosen on; the held-out scans are the study's validation scans. Pixel recall stays in the "
                  "table because the reference study reports it."),
                 ("为何以 CPM 为主指标：阈值 0.5 下的像素召回率按像素计数，标记更多像素的版本召回率上升而精确率下降，因此该指标奖励过度标记。"
                  "检测器的使用者看到的是找到的结节数和每例扫描的假阳性标记数。此处每个版本都运行完整的检测流程（部署文件在其运行时中执行，"
                  "所有版本后接同一个分类器），在完整扫描上按 LUNA16 FROC 评分：CPM 为每例 1/8、1/4、1/2、1、2、4、8 个假阳性时灵敏度的平均值。"
                  "独立抽样是未参与任何训练或选择的合成数据；留出扫描是本实验的验证扫描。像素召回率仍保留在表中，因为参考研究报告的是它。")),
    "froc_set": ("{set}: {n} scans, {nodules} nodules",
                 "{set}：{n} 例扫描，{nodules} 个结节"),
    "froc_header": (["Variant", "CPM (95% CI)", "CPM Change", "Nodules found (p >= 0.5)", "FP per scan (p >= 0.5)",
                     "Candidates per scan", "Seconds per scan", "Runtime"],
                    ["模型版本", "CPM（95% 置信区间）", "CPM 变化", "检出结节（p >= 0.5）", "每例假阳性（p >= 0.5）",
                     "每例候选数", "每例秒数", "运行时"]),
    "cpm_cols": (["CPM ({set})", "CPM Change"],
                 ["CPM（{set}）", "CPM 变化"]),
    "set_independent": ("independent draw",
                        "独立抽样"),
    "set_held_out": ("held-out scans",
                     "留出扫描"),
    "plot_cpm_memory": ("CPM against weight memory of the deployed file (Pareto front in red)",
                        "CPM 与部署文件权重内存（红线为帕累托前沿）"),
    "plot_cpm_latency": ("CPM against CPU latency per slice (Pareto front in red)",
                         "CPM 与每张切片的 CPU 延迟（红线为帕累托前沿）"),
    "timings": ("Timings",
                "耗时"),
    "timing_header": (["Stage", "Seconds"],
                      ["阶段", "秒"]),
    "needs_board": ("n/a (needs board)",
                    "n/a（需开发板）"),
    "baseline_label": ("baseline",
                       "基线"),
}
LANGUAGES = ("en", "zh")
STRINGS = {lang: {key: text[i] for key, text in _TEXT.items()} for i, lang in enumerate(LANGUAGES)}

VARIANT_NAMES = {
    "en": {"baseline": "Baseline (fp32)", "pruned": "Pruned (fp32)", "ptq": "PTQ int8", "qat": "QAT int8",
           "pruned_ptq": "Pruned + PTQ int8", "pruned_qat": "Pruned + QAT int8",
           "baseline_fp16": "Baseline (NPU fp16)"},
    "zh": {"baseline": "基线 (fp32)", "pruned": "剪枝 (fp32)", "ptq": "PTQ int8", "qat": "QAT int8",
           "pruned_ptq": "剪枝 + PTQ int8", "pruned_qat": "剪枝 + QAT int8",
           "baseline_fp16": "基线 (NPU fp16)"},
}

# The reference project's published RK3588S NPU figures on LUNA16 (weight memory in KiB, latency in
# us, recall in %); None where it published no number. Its ratios are taken against REFERENCE_BASELINE.
REFERENCE_BASELINE = "baseline_fp16"
REFERENCE = [
    {"name": "baseline_fp16", "weight_memory_kib": 236.81, "latency_us": 49079, "recall": 76.7, "recall_change_pts": 0.0},
    {"name": "ptq", "weight_memory_kib": 125.44, "latency_us": None, "recall": None, "recall_change_pts": None},
    {"name": "pruned_ptq", "weight_memory_kib": None, "latency_us": None, "recall": None, "recall_change_pts": -7.2},
    {"name": "pruned_qat", "weight_memory_kib": 40.56, "latency_us": 30191, "recall": 77.1, "recall_change_pts": 0.4},
]
