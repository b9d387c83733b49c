"""Quantization: fake-quant with an STE (QAT), calibration (PTQ), QArray storage, int8 ops."""

from jaxopt_dnn.quant.calibrate import calibrate
from jaxopt_dnn.quant.fake import compute_qparams
from jaxopt_dnn.quant.fake import fake_quant
from jaxopt_dnn.quant.fake import quantize
from jaxopt_dnn.quant.coverage import Coverage
from jaxopt_dnn.quant.qat import QatModel
from jaxopt_dnn.quant.stats import QuantStat
from jaxopt_dnn.quant.coverage import coverage
from jaxopt_dnn.quant.coverage import explain
from jaxopt_dnn.quant.serve import int8_apply
from jaxopt_dnn.quant.qat import qat
from jaxopt_dnn.quant.ops import int8_conv
from jaxopt_dnn.quant.ops import int8_dot_census
from jaxopt_dnn.quant.ops import int8_dot_general
from jaxopt_dnn.quant.ops import int8_einsum
from jaxopt_dnn.quant.qarray import QArray
from jaxopt_dnn.quant.qarray import dequantize
from jaxopt_dnn.quant.qarray import is_qarray
from jaxopt_dnn.quant.qarray import round_scale
from jaxopt_dnn.quant.rules import QuantRule
from jaxopt_dnn.quant.rules import dequantize_params
from jaxopt_dnn.quant.rules import quantize_params
from jaxopt_dnn.quant.gptq import gptq
from jaxopt_dnn.quant.gptq import gptq_solve
from jaxopt_dnn.quant.smooth import smooth
from jaxopt_dnn.quant.awq import awq
